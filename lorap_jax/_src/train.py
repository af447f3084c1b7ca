"""`train_and_evaluate`: checks, the work directory, the runs over seeds
and folds, and the summary with each framework's figures."""

import functools
import importlib.metadata
import json
import math
import numbers
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import tqdm

from lorap_jax._src import (
  a2q,
  checkpoints,
  degree_quant,
  mixq,
  models,
)
from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import quantization as q
from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib


def mean_and_std(values) -> tuple[float, float]:
  """Mean and sample std (ddof 1, as torch.std; 0 for a single value).

  The statistic of every "mean ± std" this project reports, over seeds or
  folds.

  Raises:
    ValueError: If `values` is empty.
  """
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("mean_and_std needs at least one value")
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_config(config) -> None:
  """Refuses bad settings before any data is read or anything compiled."""
  state_lib.quant_config(config)
  state_lib.prompt_config(config)
  # The class count is the data's; every other field is checked here.
  task = "node" if data_lib.is_node_dataset(config.dataset) else "graph"
  state_lib.model_config(config, num_classes=1, task=task)
  q.check_choice("selection", config.train.selection, runs_lib.SELECTIONS)
  q.check_choice("train.trainable", config.train.trainable, state_lib.TRAINABLE)
  if config.train.trainable == "prompts" and config.prompt.kind == "none":
    raise ValueError(
      "train.trainable='prompts' with prompt kind 'none' trains nothing; "
      "choose a prompt (e.g. --prompt lorap) or train.trainable='all'"
    )
  mixq_run = config.quant.framework == "mixq"
  if config.vmap_seeds and (task == "graph" or mixq_run):
    # Either would train its runs one after another, ignoring the flag.
    what = "a graph task" if task == "graph" else "MixQ's staged schedule"
    raise ValueError(
      f"vmap_seeds=True: {what} trains its runs one after another; set "
      "vmap_seeds=False (lorap sweep vmaps seeds of any task)"
    )
  if config.train.trainable == "prompts" and mixq_run:
    raise ValueError(
      "train.trainable='prompts' with framework mixq: MixQ's width search "
      "and FP32 stage train the backbone; use another framework"
    )
  for _, _, section, field in state_lib.hyperparameter_paths(config):
    value = config[section][field]
    if not _is_real(value) or not 0 <= value < math.inf:
      raise ValueError(
        f"{section}.{field}={value!r} must be a finite number >= 0"
      )
  decay_every = config.train.lr_decay_every
  decay_factor = config.train.lr_decay_factor
  if not isinstance(decay_every, int) or decay_every < 0:
    raise ValueError(
      f"train.lr_decay_every={decay_every!r} must be an integer >= 0 "
      "(epochs between decays; 0: none)"
    )
  if not _is_real(decay_factor) or not 0 < decay_factor <= 1:
    raise ValueError(
      f"train.lr_decay_factor={decay_factor!r} must be in (0, 1]"
    )
  for name in ("epochs", "seeds", "folds", "batch_size"):
    section = config if name in ("seeds", "folds") else config.train
    value = section[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be an integer >= 1")
  first_fold = config.get("first_fold", 0)
  if not isinstance(first_fold, int) or first_fold < 0:
    raise ValueError(f"first_fold={first_fold!r} must be an integer >= 0")
  growth = config.train.get("padding_growth", 0.0)
  if not (growth == 0.0 or growth > 1.0):
    raise ValueError(
      f"train.padding_growth={growth!r} must be 0 (three coarse padding "
      "sizes) or above 1 (the ratio between consecutive sizes)"
    )
  sampler = config.train.get("sampler", "full")
  q.check_choice("train.sampler", sampler, config_lib.SAMPLERS)
  if sampler == "neighbor":
    from lorap_jax._src import sampled_training

    sampled_training.check_sampled_config(config)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  progress: bool = False,
  resume: bool = False,
) -> dict:
  """Trains and evaluates the config's model on its dataset.

  Node datasets: `config.seeds` runs on the public split, full batch, or
  on neighbour-sampled mini-batches with ``train.sampler="neighbor"``
  (`sampled_training`, large graphs). Graph datasets:
  `config.folds` CV folds (from `config.first_fold`) x `config.seeds` runs
  each. In every run the test accuracy is read at the epoch chosen on
  validation data (`config.train.selection`).

  Writes to `workdir`: `config.json`, `metrics.jsonl` (one line per epoch
  and run), `summary.json`, and orbax checkpoints under `checkpoints/`
  (`config.checkpoint`: per run, per MixQ stage, or one for vmapped seeds).

  Args:
    config: see `lorap_jax.get_config`.
    workdir: output directory (created).
    progress: show a progress bar on stderr.
    resume: continue the run saved in `workdir`: finished runs are read
      back, the others restart from their newest readable checkpoint.

  Raises:
    ValueError: on bad settings, a workdir holding another run's
      checkpoints (without `resume`), or a resume whose config differs
      from the saved one.
    FloatingPointError: when the training loss stops being finite.

  Returns:
    The summary dict (also in `summary.json`); its "states" entry is not
    serialised and holds each run's selected `TrainState`.
  """
  validate_config(config)
  # Read now: a commit made while a long run trains must not be credited
  # with its result.
  version = code_version()
  workdir = pathlib.Path(workdir).absolute()
  staged = config.quant.framework == "mixq"
  checkpointed = config.checkpoint.enabled
  prepare_workdir(config, workdir, resume=resume, checkpointed=checkpointed)
  dataset = data_lib.load_dataset(
    config.dataset, config.data_dir or None, **dataset_options(config)
  )
  node_task = isinstance(dataset, data_lib.NodeDataset)
  steps_lib.task_loss(config, getattr(dataset, "task", "classification"))
  model = state_lib.create_model(
    config,
    num_classes=dataset.num_classes,
    task="node" if node_task else "graph",
  )
  data_lib.validate_prompt_sizes(  # Where the model meets the dataset.
    model.prompt,
    input_width=dataset.num_features,
    aggregate_widths=model.aggregate_widths(dataset.num_features),
  )
  log = runs_lib.MetricsLog(workdir / "metrics.jsonl", append=resume)
  records: list[runs_lib.RunRecord] = []
  seeds = range(config.seeds)

  def checkpointer(name):
    if not checkpointed:
      return None
    return checkpoints.run_checkpointer(
      workdir / "checkpoints" / name, config.checkpoint
    )

  def stage_checkpointers(name):
    # MixQ: one checkpoint directory per stage of the run.
    if not checkpointed:
      return None
    return lambda stage: checkpointer(f"{name}/{stage}")

  try:
    if node_task and config.train.sampler == "neighbor":
      # Imported here: it builds on this module (large graphs, mini-batches).
      from lorap_jax._src import sampled_training

      total = config.seeds * config.train.epochs
      with tqdm.tqdm(total=total, disable=not progress, unit="ep") as bar:
        records = sampled_training.train_node_runs(
          model, config, dataset, log, bar, checkpointer
        )
    elif node_task:
      graph, eval_batch = runs_lib.node_inputs(dataset, config)
      total = config.seeds * runs_lib.epochs_per_run(config)
      with tqdm.tqdm(total=total, disable=not progress, unit="ep") as bar:
        if config.vmap_seeds and not staged:
          bar.set_description(f"{config.seeds} seeds, vmapped")
          records = runs_lib.train_node_runs_vmapped(
            model,
            config,
            graph,
            runs_lib.seed_eval_batch(dataset, eval_batch, list(seeds)),
            list(seeds),
            log,
            bar,
            checkpointer=checkpointer("seeds_vmapped"),
          )
        else:
          for seed in seeds:
            bar.set_description(f"seed {seed}")
            seed_batch = runs_lib.seed_eval_batch(dataset, eval_batch, seed)
            if staged:
              record = runs_lib.train_mixq_node_run(
                config,
                dataset.num_classes,
                graph,
                seed_batch,
                seed,
                log,
                bar,
                checkpointer=stage_checkpointers(f"seed_{seed}"),
              )
            else:
              record = runs_lib.train_node_run(
                model,
                config,
                graph,
                seed_batch,
                seed,
                log,
                bar,
                checkpointer=checkpointer(f"seed_{seed}"),
              )
            records.append(record)
    else:
      folds = selected_folds(config, dataset)
      budgets = data_lib.make_budgets(
        dataset.graphs,
        config.train.batch_size,
        shards=runs_lib.data_parallel_mesh(config).size,
        growth=config.train.padding_growth,
      )
      total = len(folds) * config.seeds * runs_lib.epochs_per_run(config)
      run_graph, run_checkpointer = (
        (runs_lib.train_mixq_graph_run, stage_checkpointers)
        if staged
        else (runs_lib.train_graph_run, checkpointer)
      )
      with tqdm.tqdm(total=total, disable=not progress, unit="ep") as bar:
        for fold_index, fold in folds:
          for seed in seeds:
            bar.set_description(f"fold {fold_index} seed {seed}")
            record = run_graph(
              model,
              config,
              dataset,
              fold,
              fold_index,
              budgets,
              seed,
              log,
              bar,
              checkpointer=run_checkpointer(f"fold_{fold_index}_seed_{seed}"),
            )
            records.append(record)
            release_compiled_code_if_needed()
  finally:
    log.close()
  summary = run_summary(config, dataset, records, node_task, version)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  summary["states"] = [r.state for r in records]
  return summary


# Compiled programs stay mapped in memory while jit's caches hold them. A
# graph run can compile new ones in every fold (MixQ's fixed stage for each
# fold's widths, new padded batch sizes): a 10-fold PROTEINS MixQ + LoRAP
# run reached the kernel's limit of 65,530 memory mappings in fold 8, where
# LLVM failed to allocate and the process died. Past this share of the
# limit, the caches are dropped and the next fold compiles afresh.
MAPPING_SHARE_BEFORE_RELEASE = 0.5


def memory_mapping_share() -> float | None:
  """The share of the kernel's memory-mapping limit (`vm.max_map_count`)
  this process uses, or None where unknown (not Linux)."""
  try:
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    with open("/proc/self/maps", "rb") as maps:
      used = sum(1 for _ in maps)
  except (OSError, ValueError):
    return None
  return used / limit


def release_compiled_code_if_needed() -> bool:
  """Drops jit's compiled programs once the process uses more than
  `MAPPING_SHARE_BEFORE_RELEASE` of its memory mappings; whether it did."""
  share = memory_mapping_share()
  if share is None or share < MAPPING_SHARE_BEFORE_RELEASE:
    return False
  jax.clear_caches()
  return True


def selected_folds(config, dataset) -> list[tuple[int, data_lib.Fold]]:
  """(index, fold) of the config's folds, refusing ones the dataset lacks."""
  first = config.get("first_fold", 0)
  if first + config.folds > len(dataset.folds):
    raise ValueError(
      f"first_fold={first} with folds={config.folds} asks for folds {first}.."
      f"{first + config.folds - 1}, but {config.dataset} has "
      f"{len(dataset.folds)} (0..{len(dataset.folds) - 1})"
    )
  return list(enumerate(dataset.folds))[first : first + config.folds]


def prepare_workdir(config, workdir, *, resume, checkpointed) -> None:
  """Creates the workdir and guards what an earlier run saved there."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write-test"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise ValueError(f"workdir {workdir} is not writable: {error}") from error
  saved_config = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if resume:
    if not checkpointed:
      raise ValueError(
        "--resume needs checkpoints, which checkpoint.enabled=False turns off"
      )
    if not saved_config.exists():
      raise ValueError(f"nothing to resume in {workdir}: no config.json")
    differences = config_differences(
      json.loads(saved_config.read_text()), current
    )
    if differences:
      raise ValueError(
        f"refusing to resume {workdir} with a different config: "
        + "; ".join(differences[:6])
      )
    return
  if any((workdir / "checkpoints").glob("*")):
    raise ValueError(
      f"{workdir} holds checkpoints of an earlier run; pass --resume to "
      "continue it or choose another --workdir (nothing was overwritten)"
    )
  saved_config.write_text(config.to_json_best_effort(indent=2))


# Fields a resumed run may change: they do not touch what is trained.
_RESUMABLE_CHANGES = (
  "data_dir",
  "checkpoint.every",
  "checkpoint.keep",
  "checkpoint.min_interval_s",
)


def config_differences(saved: dict, current: dict, prefix="") -> list[str]:
  """'key: saved -> now' for every field that differs, aside from the data
  directory and how often checkpoints are written."""
  differences = []
  for key in sorted(set(saved) | set(current)):
    path = f"{prefix}{key}"
    old, new = saved.get(key), current.get(key)
    if path in _RESUMABLE_CHANGES or old == new:
      continue
    if isinstance(old, dict) and isinstance(new, dict):
      differences += config_differences(old, new, f"{path}.")
    else:
      differences.append(f"{path}: saved {old!r}, now {new!r}")
  return differences


def dataset_options(config) -> dict:
  if "csbm" in config:  # A generated graph: its own settings.
    return config.csbm.to_dict()
  if data_lib.is_node_dataset(config.dataset):
    return {"normalize_features": config.normalize_features}
  return {"node_features": config.node_features}


def framework_figures(config, dataset, records) -> dict:
  """The QAT framework's own figures for the summary, next to accuracies.

  Degree-Quant: the expected fraction of (real) nodes protected per forward
  pass in training, the mean over nodes of p_v. A2Q: the average learned
  feature bit width of the selected models (mean over runs): per node and
  feature of every feature point over the dataset's graphs in graph tasks,
  where most of a pool's entries serve no node; in node tasks the mean
  over the per-node widths, the same thing there. MixQ: each
  run's selected widths, their mean, and (node tasks) the estimated bit
  operations of one forward pass of the fixed model.
  """
  quant = state_lib.quant_config(config)
  if quant.mixq is not None:
    return _mixq_figures(config, dataset, records)
  if quant.a2q is not None:
    if isinstance(dataset, data_lib.NodeDataset):
      bits = [a2q.average_feature_bits(r.state.params) for r in records]
    else:
      graphs = list(_every_graph_batch(config, dataset))
      bits = [_a2q_stored_feature_bits(r.state, graphs) for r in records]
    return {"a2q_average_feature_bits": float(np.mean(bits))}
  if quant.protection is None:
    return {}
  if isinstance(dataset, data_lib.NodeDataset):
    graph = dataset.graph
  else:
    graph = jraph.batch_np(list(dataset.graphs))
  probability = degree_quant.protection_probability(graph, quant.protection)
  return {"dq_protected_fraction": float(jnp.mean(probability))}


def _every_graph_batch(config, dataset):
  """Padded batches of every graph of a graph dataset, in order."""
  batch_size = config.train.batch_size
  budgets = data_lib.make_budgets(dataset.graphs, batch_size)
  every_graph = np.arange(len(dataset.graphs))
  for batch in data_lib.iterate_batches(
    dataset, every_graph, batch_size, budgets, shuffle=False
  ):
    yield batch.graph


def _a2q_stored_feature_bits(state, graphs) -> float:
  """The mean rounded width of a real node's stored feature, over every
  A2Q feature point and every graph of `graphs` (padded batches)."""
  stored = sum(np.asarray(_stored_feature_bits(state, g)) for g in graphs)
  return float(stored[0] / stored[1])


@jax.jit
def _stored_feature_bits(state: state_lib.TrainState, graph) -> jax.Array:
  """(stored bits, stored elements) of one batch, from A2Q's sown memory."""
  return sum(jax.tree.leaves(_sown(state, graph, a2q.FEATURE_MEMORY)))[2:]


def _sown(state: state_lib.TrainState, graph, collection: str):
  """What an evaluation forward pass sows into `collection`."""
  _, sown = state.apply_fn(
    state.variables(),
    graph,
    bits=state.bits,
    train=False,
    mutable=[collection],
  )
  return sown[collection]


def _mixq_figures(config, dataset, records) -> dict:
  selections = [r.extras["mixq_selected_bits"] for r in records]
  figures = {
    "mixq_selected_bits": selections,
    "mixq_average_bits": float(
      np.mean([np.mean(list(chosen.values())) for chosen in selections])
    ),
  }
  if isinstance(dataset, data_lib.NodeDataset):
    graph, _ = runs_lib.node_inputs(dataset, config)
    counts = []
    for record, chosen in zip(records, selections, strict=True):
      operations = _sown(record.state, graph, mixq.OPERATIONS)
      counts.append(mixq.bit_operations(operations, chosen))
    figures["mixq_bit_operations"] = float(np.mean(counts))
    # The same forward pass at 32 bits everywhere, for the reduction factor.
    figures["mixq_bit_operations_fp32"] = mixq.bit_operations(operations, {})
  return figures


def _headline(records, regression: bool) -> dict:
  """Mean, std and per-run values of the test and val accuracy (or MAE)."""
  metric = "mae" if regression else "acc"
  fields = {}
  for split in ("test", "val"):
    values = [getattr(r, f"{split}_{metric}") for r in records]
    mean, std = mean_and_std(values)
    fields[f"{split}_{metric}_mean"] = mean
    fields[f"{split}_{metric}_std"] = std
  for split in ("test", "val"):
    fields[f"{split}_{metric}s"] = [
      getattr(r, f"{split}_{metric}") for r in records
    ]
  return fields


@functools.cache
def code_version() -> str:
  """The library's git commit, with "+changes" when its files differ from
  it, or the installed package's version outside a git checkout: which
  code produced a saved result."""
  package = pathlib.Path(__file__).resolve().parents[1]

  def git(*args):
    return subprocess.run(
      ["git", "-C", str(package), *args],
      capture_output=True,
      text=True,
      timeout=10,
      check=False,
    )

  try:
    head = git("rev-parse", "--short=12", "HEAD")
    tracked = git("ls-files", "--", ".")  # Empty for an installed copy.
    changed = git("status", "--porcelain", "--", ".")
  except (OSError, subprocess.SubprocessError):
    head = None
  if head is None or head.returncode or not tracked.stdout.strip():
    return "lorap-jax " + importlib.metadata.version("lorap-jax")
  return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def run_summary(config, dataset, records, node_task, version) -> dict:
  regression = getattr(dataset, "task", "classification") == "regression"
  # Epochs 0 and 1 include compilation; the rest are steady-state.
  steady = [t for r in records for t in r.epoch_times_ms[2:]]
  params = records[0].state.params
  groups = state_lib.parameter_groups(params)
  prompt_params = sum(
    leaf.size
    for leaf, group in zip(
      jax.tree.leaves(params), jax.tree.leaves(groups), strict=True
    )
    if group == "prompt"
  )
  runs = config_lib.runs_of(config)
  return {
    "dataset": config.dataset,
    "model": config.model.architecture,
    "framework": config.quant.framework,
    "bits": None if config.quant.framework == "fp32" else config.quant.bits,
    "prompt": config.prompt.kind,
    "task": "regression" if regression else "classification",
    **_headline(records, regression),
    "best_epochs": [r.best_epoch for r in records],
    "num_runs": len(records),
    "epoch_time_ms_median": float(np.median(steady)) if steady else None,
    "num_params": models.count_parameters(params),
    "num_prompt_params": int(prompt_params),
    **framework_figures(config, dataset, records),
    "protocol": (
      f"{len(records)} runs ({runs}); test "
      + (
        f"MAE ({config.train.regression_loss} loss)"
        if regression
        else "accuracy"
      )
      + f" at the epoch selected by {config.train.selection}; mean and sample "
      "std (ddof=1) over runs; "
      "epoch time = train step + evaluation, median over epochs after the "
      "first two, results ready"
      + (
        " (seeds vmapped: the batched epoch over the number of seeds)"
        if config.vmap_seeds and node_task
        else ""
      )
    ),
    "device": jax.devices()[0].device_kind,
    "jax_version": jax.__version__,
    "code_version": version,
    "config": config.to_dict(),
  }
