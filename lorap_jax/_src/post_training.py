"""Post-training prompts: train only the prompts of a trained quantized model.

`post_train_prompts` reads a finished run's workdir (its `config.json` and
each seed's validation-selected checkpoint), keeps the backbone, its
quantizer ranges and BatchNorm statistics as trained, adds the config's
prompts (the source's own if it had the same ones, else freshly
initialised), and trains the prompts alone (`train.trainable="prompts"`) on
a small labelled calibration set: `train.calibration_size` nodes drawn per
seed from the training split. Selection and evaluation use the usual
validation and test masks. Everything is written to a new workdir; the
source is only read.
"""

import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import tqdm

from lorap_jax._src import checkpoints
from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import quant_points as qp
from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train as train_lib
from lorap_jax._src import train_state as state_lib

# Config fields that define the trained backbone: post-training must keep
# them as the source run had them.
BACKBONE_FIELDS = (
  "dataset",
  "node_features",
  "normalize_features",
  "model",
  "quant",
  "dq",
  "a2q",
  "mixq",
)


def post_training_config(
  trained_workdir: str | os.PathLike,
) -> ml_collections.ConfigDict:
  """The config a trained run saved, set up for post-training its prompts.

  Fields the saved config lacks (from older versions) keep their defaults;
  `train.trainable` is "prompts". Change the prompt, epochs or calibration
  size before passing it to `post_train_prompts`.

  Raises:
    ValueError: if `trained_workdir` holds no readable config.json.
  """
  config = _source_config(pathlib.Path(trained_workdir).absolute())
  config.train.trainable = "prompts"
  # The trained ranges stay: training on would drift them away from what
  # the frozen weights were selected with (measured on Cora INT4: -4 points
  # of val accuracy in 20 epochs with no prompt step at all).
  config.train.update_statistics = False
  return config


def _source_config(source: pathlib.Path) -> ml_collections.ConfigDict:
  """The config the trained run saved, on top of today's defaults."""
  saved = _saved_config(source)
  config = config_lib.get_config(saved["dataset"])
  _update(config, saved)
  return config


def _saved_config(source: pathlib.Path) -> dict:
  path = source / "config.json"
  if not path.is_file():
    raise ValueError(
      f"{source} is not a trained run's workdir: it has no config.json"
    )
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from error


def _update(config, saved: dict) -> None:
  """Writes `saved`'s values into `config`, skipping unknown fields."""
  for key, value in saved.items():
    if key not in config:
      continue
    if isinstance(value, dict):
      _update(config[key], value)
    elif value is None or config[key] is None:
      config[key] = value  # Placeholders (config_dict.placeholder).
    else:
      config[key] = type(config[key])(value)  # JSON wrote 0.0 as 0.


def post_train_prompts(
  config: ml_collections.ConfigDict,
  trained_workdir: str | os.PathLike,
  workdir: str | os.PathLike,
  *,
  progress: bool = False,
) -> dict:
  """Trains only the prompts of a trained model on a calibration set.

  Node tasks. For each of `config.seeds` seeds, the source run's
  validation-selected state of that seed is loaded (parameters, quantizer
  ranges, BatchNorm statistics); its prompts are kept when the source had
  the same prompt config, otherwise the config's prompts are initialised
  fresh from the seed (LoRAP's default start is a no-op, so the model
  starts exactly as trained). Then `train.epochs` epochs of prompt-only
  training on `train.calibration_size` training nodes, selection on the
  validation mask as `train_and_evaluate`.

  Args:
    config: the post-training config (see `post_training_config`); its
      backbone fields (`BACKBONE_FIELDS`) must equal the source's.
    trained_workdir: the workdir of a finished `train_and_evaluate` run.
    workdir: a new output directory (not `trained_workdir`).
    progress: show a progress bar.

  Raises:
    ValueError: on a missing or incompatible source, `workdir` equal to
      the source, a calibration size outside 1..(training nodes), a graph
      task or a MixQ source, or the errors of `train_and_evaluate`.

  Returns:
    `train_and_evaluate`'s summary, plus "post_training": the source, the
    calibration size, and per seed the source state's and the starting
    model's val / test accuracy (before any prompt step).
  """
  source = pathlib.Path(trained_workdir).absolute()
  workdir = pathlib.Path(workdir).absolute()
  if workdir.resolve() == source.resolve():
    raise ValueError(
      f"workdir {workdir} is the trained run's own workdir; post-training "
      "writes to a new one so that nothing saved there is overwritten"
    )
  source_config = _source_config(source)
  config = config_lib.with_fields(config, {"train.trainable": "prompts"})
  _check_compatible(source_config, config)
  train_lib.validate_config(config)
  version = train_lib.code_version()  # The code of this run, read now.
  runs = _source_runs(source, source_config, config.seeds)
  train_lib.prepare_workdir(
    config, workdir, resume=False, checkpointed=config.checkpoint.enabled
  )
  dataset = data_lib.load_dataset(
    config.dataset,
    config.data_dir or None,
    **train_lib.dataset_options(config),
  )
  num_classes = dataset.num_classes
  source_model = state_lib.create_model(
    source_config, num_classes=num_classes, task="node"
  )
  model = state_lib.create_model(config, num_classes=num_classes, task="node")
  data_lib.validate_prompt_sizes(
    model.prompt,
    input_width=dataset.num_features,
    aggregate_widths=model.aggregate_widths(dataset.num_features),
  )
  source_graph, source_batch = runs_lib.node_inputs(dataset, source_config)
  graph, eval_batch = runs_lib.node_inputs(dataset, config)
  log = runs_lib.MetricsLog(workdir / "metrics.jsonl")
  records, before = [], {"source": [], "initial": []}
  try:
    with tqdm.tqdm(
      total=config.seeds * config.train.epochs, disable=not progress, unit="ep"
    ) as bar:
      for seed in range(config.seeds):
        bar.set_description(f"seed {seed}")
        loaded = _load_selected(
          runs, source_model, source_config, source_graph, seed
        )
        before["source"].append(
          _accuracies(
            loaded, runs_lib.seed_eval_batch(dataset, source_batch, seed)
          )
        )
        start = _start_variables(
          model, loaded, source_config, config, graph, seed
        )
        seed_batch = runs_lib.seed_eval_batch(dataset, eval_batch, seed)
        calibration = _calibration_batch(
          seed_batch, config.train.calibration_size, seed
        )
        initial = _starting_state(model, config, start)
        before["initial"].append(_accuracies(initial, seed_batch))
        checkpointer = None
        if config.checkpoint.enabled:
          checkpointer = checkpoints.run_checkpointer(
            workdir / "checkpoints" / f"seed_{seed}", config.checkpoint
          )
        records.append(
          runs_lib.train_node_run(
            model,
            config,
            graph,
            calibration,
            seed,
            log,
            bar,
            start_from=start,
            checkpointer=checkpointer,
          )
        )
  finally:
    log.close()
  summary = train_lib.run_summary(config, dataset, records, True, version)
  summary["post_training"] = {
    "source_workdir": str(source),
    "calibration_size": config.train.calibration_size,
    **{
      f"{when}_{split}_accs": [accs[split] for accs in before[when]]
      for when in ("source", "initial")
      for split in ("val", "test")
    },
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  summary["states"] = [r.state for r in records]
  return summary


def _check_compatible(source_config, config) -> None:
  """Refuses a config whose backbone differs from the trained one's."""
  saved = json.loads(source_config.to_json_best_effort())
  current = json.loads(config.to_json_best_effort())
  differences = train_lib.config_differences(
    {k: saved[k] for k in BACKBONE_FIELDS},
    {k: current[k] for k in BACKBONE_FIELDS},
  )
  if differences:
    raise ValueError(
      "the config's backbone differs from the trained run's: "
      + "; ".join(differences[:6])
    )
  if not data_lib.is_node_dataset(config.dataset):
    raise ValueError(
      f"post-training prompts supports node tasks; {config.dataset} is a "
      "graph task"
    )
  if source_config.quant.framework == "mixq":
    raise ValueError(
      "post-training a MixQ run is not supported: its selected model is "
      "the fine-tuning stage of a staged run"
    )


def _source_runs(source: pathlib.Path, source_config, seeds: int) -> dict:
  """Seed -> the source's run directory, or "vmapped" -> the stacked one."""
  root = source / "checkpoints"
  vmapped = root / "seeds_vmapped"
  if vmapped.is_dir():
    available = source_config.seeds
    runs = {"vmapped": vmapped}
  else:
    runs = {s: root / f"seed_{s}" for s in range(seeds)}
    available = sum(path.is_dir() for path in runs.values())
    missing = [str(p) for p in runs.values() if not p.is_dir()]
    if missing:
      raise ValueError(
        f"the trained run has no checkpoints for {len(missing)} of the "
        f"{seeds} seeds asked for (first missing: {missing[0]}); was it "
        "trained with checkpoints and at least as many seeds?"
      )
  if seeds > available:
    raise ValueError(
      f"seeds={seeds} but the trained run in {source} has {available}"
    )
  return runs


def _load_selected(runs, model, source_config, graph, seed):
  """The source run's validation-selected `TrainState` of `seed`."""

  def template(key):
    return state_lib.initial_train_state(source_config, model, graph, key)

  if "vmapped" in runs:
    keys = jax.numpy.stack(
      [jax.random.key(s) for s in range(source_config.seeds)]
    )
    stacked = checkpoints.restore_selected(
      runs["vmapped"], jax.vmap(template)(keys)
    )
    return runs_lib.seed_row(stacked, seed)
  return checkpoints.restore_selected(
    runs[seed], template(jax.random.key(seed))
  )


def _starting_state(model, config, start) -> state_lib.TrainState:
  """The post-training model before any step, for its accuracies (no
  optimizer: nothing trains it)."""
  return state_lib.TrainState(
    step=jax.numpy.zeros((), "int32"),
    params=start["params"],
    quant_stats=start.get(qp.QUANT_STATS, {}),
    batch_stats=start.get("batch_stats", {}),
    opt_state=(),
    bits=jax.numpy.asarray(config.quant.bits, "float32"),
    apply_fn=model.apply,
    tx=None,
    quant=model.quant,
  )


def _accuracies(state, eval_batch) -> dict[str, float]:
  metrics = steps_lib.summarize_eval([steps_lib.eval_step(state, eval_batch)])
  return {split: metrics[split]["accuracy"] for split in ("val", "test")}


def _start_variables(model, loaded, source_config, config, graph, seed):
  """The post-training model's variables: fresh, then the loaded ones.

  The source's prompt parameters are kept only when its prompt config is
  the post-training one; otherwise the fresh prompts (drawn from the
  seed's init key, as `train_and_evaluate` would) stay.
  """
  init_key, _ = jax.random.split(jax.random.key(seed))
  fresh = state_lib.init_variables(
    model, init_key, graph, jax.numpy.asarray(config.quant.bits, "float32")
  )
  params = loaded.params
  if state_lib.prompt_config(source_config) != state_lib.prompt_config(config):
    params = _without_prompts(params)
  loaded_variables = {
    "params": params,
    qp.QUANT_STATS: loaded.quant_stats,
    "batch_stats": loaded.batch_stats,
  }
  return _merged(dict(fresh), loaded_variables, "")


def _without_prompts(params):
  groups = state_lib.parameter_groups(params)

  def keep(tree, labels):
    if not isinstance(tree, dict):
      return tree
    kept = {}
    for name, subtree in tree.items():
      if labels[name] == "prompt":
        continue
      if isinstance(subtree, dict):
        subtree = keep(subtree, labels[name])
        if not subtree:
          continue
      kept[name] = subtree
    return kept

  return keep(dict(params), groups)


def _merged(fresh, loaded, path: str):
  """`fresh` with every leaf of `loaded` written over it (same shapes)."""
  if not isinstance(loaded, dict) and not hasattr(loaded, "items"):
    if np.shape(fresh) != np.shape(loaded):
      raise ValueError(
        f"the trained run's {path} has shape {np.shape(loaded)}, the model "
        f"expects {np.shape(fresh)}: incompatible source"
      )
    return loaded
  merged = dict(fresh)
  for name, subtree in loaded.items():
    if hasattr(subtree, "items") and not subtree:
      continue  # An empty collection (no BatchNorm) has nothing to load.
    if name not in fresh:
      raise ValueError(
        f"the trained run has {path}/{name}, which this model lacks: "
        "incompatible source"
      )
    merged[name] = _merged(fresh[name], subtree, f"{path}/{name}")
  return merged


def _calibration_batch(eval_batch, size: int, seed: int):
  """`eval_batch` whose "train" mask keeps `size` training nodes, drawn
  uniformly per seed."""
  train_mask = np.asarray(eval_batch.masks["train"])
  candidates = np.flatnonzero(train_mask)
  if not isinstance(size, int) or not 1 <= size <= candidates.size:
    raise ValueError(
      f"train.calibration_size={size!r} must be an integer in "
      f"1..{candidates.size} (the training nodes)"
    )
  chosen = np.random.default_rng(seed).choice(candidates, size, replace=False)
  mask = np.zeros_like(train_mask)
  mask[chosen] = True
  masks = {**eval_batch.masks, "train": jax.device_put(mask)}
  return eval_batch._replace(masks=masks)
