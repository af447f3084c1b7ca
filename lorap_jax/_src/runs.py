"""One run's training: batches, the training loops of node and graph
tasks (a seed, all seeds vmapped, a fold; MixQ's stages) and their
metrics log. `train.train_and_evaluate` runs them."""

import functools
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import distributed, layers, mixq
from lorap_jax._src import quantization as q
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib

# ---------------------------------------------------------------------------
# Data to batches.
# ---------------------------------------------------------------------------


def node_inputs(
  dataset, config
) -> tuple[jraph.GraphsTuple, steps_lib.EvalBatch]:
  """Device-side graph and the train/val/test eval batch of a node dataset.

  Features go to the sparse COO form when they are mostly zeros, no node
  prompt densifies them anyway, and the first layer multiplies them (GIN
  aggregates raw features, which is cheaper dense).
  """
  graph = dataset.graph
  features = np.asarray(graph.nodes, np.float32)
  density = np.count_nonzero(features) / max(features.size, 1)
  sparse = (
    config.sparse_input
    and density < 0.1
    and config.prompt.kind in ("none", "lorap")
    and config.model.architecture != "gin"
    # MixQ calibrates the input per feature column, which needs them all.
    and config.quant.framework != "mixq"
  )
  nodes = layers.SparseFeatures.from_dense(features) if sparse else features
  graph = jax.device_put(graph._replace(nodes=nodes))
  masks = {
    "train": dataset.train_mask,
    "val": dataset.val_mask,
    "test": dataset.test_mask,
  }
  eval_batch = steps_lib.EvalBatch(
    graph, jnp.asarray(dataset.labels), jax.device_put(masks)
  )
  return graph, eval_batch


def seed_eval_batch(
  dataset, eval_batch: steps_lib.EvalBatch, seeds
) -> steps_lib.EvalBatch:
  """`eval_batch` with the masks of `seeds` for per-seed splits (Amazon).

  Datasets with a fixed split get `eval_batch` back. `seeds` is one seed
  (masks ``[n_nodes]``) or a list (masks stacked ``[n_seeds, n_nodes]``,
  for the vmapped runs).
  """
  if not dataset.random_split:
    return eval_batch
  splits = [dataset.split_for_seed(s) for s in np.atleast_1d(seeds).tolist()]
  masks = {
    name: np.stack([getattr(split, f"{name}_mask") for split in splits])
    for name in ("train", "val", "test")
  }
  if np.ndim(seeds) == 0:
    masks = {name: mask[0] for name, mask in masks.items()}
  return eval_batch._replace(masks=jax.device_put(masks))


def _graph_batches(
  dataset, indices, config, budgets, *, shuffle, rng, place=None
):
  """Padded training batches; `place` lays each out on the devices."""
  for batch in data_lib.iterate_batches(
    dataset,
    indices,
    config.train.batch_size,
    budgets,
    shuffle=shuffle,
    rng=rng,
  ):
    batch = steps_lib.Batch(batch.graph, batch.labels, batch.graph_mask)
    yield batch if place is None else place(batch)


def data_parallel_mesh(config) -> jax.sharding.Mesh:
  """The mesh a graph task's batches are split over (`config.devices`)."""
  return distributed.device_mesh(distributed.DATA_AXIS, config.devices)


def _batch_placement(mesh):
  """How batches go onto `mesh`: None (as they are) on one device."""
  if mesh.size == 1:
    return None
  return functools.partial(
    distributed.put, sharding=distributed.split_leading(mesh)
  )


# ---------------------------------------------------------------------------
# The training loops.
# ---------------------------------------------------------------------------


class RunRecord(NamedTuple):
  """The outcome of one run (one seed, or one fold and seed).

  Classification runs have accuracies and no MAE; regression runs the
  reverse (accuracies None).
  """

  best_epoch: int
  val_acc: float | None
  test_acc: float | None
  epoch_times_ms: list[float]
  state: state_lib.TrainState
  # Framework figures of this run (e.g. MixQ's selected widths).
  extras: Mapping[str, Any] = {}
  # The state after the last epoch (MixQ selects widths from it).
  last_state: state_lib.TrainState | None = None
  val_mae: float | None = None
  test_mae: float | None = None


SELECTIONS = ("val_acc", "val_loss", "val_mae")


class _Selector:
  """Tracks the selected epoch: best val accuracy, or lowest val loss or
  val MAE (the earliest epoch on ties)."""

  def __init__(self, criterion: str):
    q.check_choice("selection", criterion, SELECTIONS)
    self.criterion = criterion
    self.best: tuple[float, int, dict] | None = None

  def update(
    self, epoch: int, metrics: dict, state: state_lib.TrainState
  ) -> None:
    val = metrics["val"]
    if self.criterion == "val_acc":
      score = val["accuracy"]
    else:
      score = -val["mae" if self.criterion == "val_mae" else "loss"]
    if self.best is None or score > self.best[0]:
      self.best = (score, epoch, metrics)
      self.state = state


def timed(fn):
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return result, (time.perf_counter() - start) * 1e3


class RunLoop:
  """One run's epoch bookkeeping: selection, times, checkpoints, resume.

  With a checkpointer it resumes from the newest readable checkpoint (the
  state, the selection so far, the epoch times and the shuffling
  generator), saves the latest state (and the selected one, if it moved)
  every `checkpoint.every` epochs but at most every
  `checkpoint.min_interval_s` seconds, and refuses a non-finite loss.
  """

  def __init__(self, config, state, checkpointer=None, rng=None, name=""):
    self.selector = _Selector(config.train.selection)
    self.times: list[float] = []
    self.state = state
    self.start_epoch = 0
    self.last_epoch = config.train.epochs - 1
    self.checkpointer = checkpointer
    self.rng = rng
    self.name = name
    if checkpointer is not None:
      self._resume()

  def _resume(self):
    restored = self.checkpointer.restore_latest(self.state)
    if restored is None:
      return
    epoch, self.state, progress = restored
    self.start_epoch = epoch + 1
    self.times = list(progress["times"])
    score, best_epoch, metrics = progress["best"]
    self.selector.best = (score, best_epoch, metrics)
    self.selector.state = self.checkpointer.restore_best(self.state)
    if self.rng is not None:
      self.rng.bit_generator.state = progress["rng"]

  def end_epoch(self, epoch, state, train_loss, metrics, elapsed) -> None:
    """Records an epoch; raises FloatingPointError on a non-finite loss."""
    _refuse_non_finite(
      train_loss,
      f"{self.name} at epoch {epoch} (optimizer step {int(state.step)})",
      self.checkpointer,
    )
    self.times.append(elapsed)
    previous = self.selector.best
    self.selector.update(epoch, metrics, state)
    self.state = state
    if self.checkpointer is None:
      return
    if self.selector.best is not previous:
      self.checkpointer.select(epoch, state)
    if self.checkpointer.due(epoch, self.last_epoch):
      progress = {"times": self.times, "best": list(self.selector.best)}
      if self.rng is not None:
        progress["rng"] = self.rng.bit_generator.state
      self.checkpointer.save(epoch, state, progress)

  def record(self) -> RunRecord:
    _, best_epoch, best = self.selector.best
    val, test = best["val"], best["test"]
    record = RunRecord(
      best_epoch,
      val.get("accuracy"),
      test.get("accuracy"),
      self.times,
      self.selector.state,
      last_state=self.state,
      val_mae=val.get("mae"),
      test_mae=test.get("mae"),
    )
    if self.checkpointer is not None:
      self.checkpointer.finish(
        {
          "best_epoch": best_epoch,
          "val_acc": record.val_acc,
          "test_acc": record.test_acc,
          "val_mae": record.val_mae,
          "test_mae": record.test_mae,
          "times": self.times,
        }
      )
      self.checkpointer.close()
    return record


def _refuse_non_finite(loss, where: str, checkpointer) -> None:
  """Raises FloatingPointError if `loss` is not finite, naming `where`."""
  if np.isfinite(float(loss)):
    return
  saved = None if checkpointer is None else checkpointer.latest_epoch()
  kept = (
    f"the last good checkpoint (epoch {saved}) is kept in "
    f"{checkpointer.directory}"
    if saved is not None
    else "no checkpoint was written"
  )
  raise FloatingPointError(
    f"non-finite training loss {float(loss)} in {where}; training stopped "
    f"and {kept}. Lower the learning rate or check the data."
  )


def _restore_finished(checkpointer, template):
  """(record.json, selected state, last state) of a finished run, or None."""
  if checkpointer is None:
    return None
  done = checkpointer.finished_record()
  if done is None:
    return None
  best = checkpointer.restore_best(template)
  # The last epoch is always saved, so the final state is there too.
  _, last, _ = checkpointer.restore_latest(template)
  checkpointer.close()
  return done, best, last


def finished_run(checkpointer, template) -> RunRecord | None:
  """The record of a run a checkpointer saw finish, or None."""
  finished = _restore_finished(checkpointer, template)
  if finished is None:
    return None
  done, best, last = finished
  return RunRecord(
    done["best_epoch"],
    done["val_acc"],
    done["test_acc"],
    done["times"],
    best,
    last_state=last,
    val_mae=done.get("val_mae"),
    test_mae=done.get("test_mae"),
  )


def train_node_run(
  model,
  config,
  graph,
  eval_batch,
  seed,
  log,
  progress,
  start_from=None,
  checkpointer=None,
) -> RunRecord:
  train_batch = steps_lib.Batch(
    graph, eval_batch.labels, eval_batch.masks["train"]
  )
  key = jax.random.key(seed)
  init_key, dropout_key = jax.random.split(key)
  state = state_lib.initial_train_state(
    config,
    model,
    graph,
    init_key,
    start_from=start_from,
    update_statistics=config.train.update_statistics,
  )
  finished = finished_run(checkpointer, state)
  if finished is not None:
    progress.update(config.train.epochs)
    return finished
  loop = RunLoop(config, state, checkpointer, name=f"seed {seed}")
  if checkpointer is not None:
    log.drop(loop.start_epoch, seed=seed)
  progress.update(loop.start_epoch)
  state = loop.state
  for epoch in range(loop.start_epoch, config.train.epochs):
    rng = jax.random.fold_in(dropout_key, epoch)

    def epoch_fn(state=state, rng=rng):
      new_state, train_metrics = steps_lib.train_step(state, train_batch, rng)
      return (
        new_state,
        train_metrics,
        steps_lib.eval_step(new_state, eval_batch),
      )

    (state, train_metrics, sums), elapsed = timed(epoch_fn)
    metrics = steps_lib.summarize_eval([sums])
    log(
      seed=seed, epoch=epoch, train=train_metrics, metrics=metrics, ms=elapsed
    )
    loop.end_epoch(epoch, state, train_metrics["loss"], metrics, elapsed)
    progress.update(1)
  return loop.record()


# All seeds of a node task in one program: states stacked on a leading axis.
_seeds_train_step = jax.jit(
  jax.vmap(steps_lib.train_step, in_axes=(0, None, 0))
)
_seeds_eval_step = jax.jit(jax.vmap(steps_lib.eval_step, in_axes=(0, None)))
# The same where each seed has its own split: the masks carry a seed axis.
_split_seeds_train_step = jax.jit(
  jax.vmap(steps_lib.train_step, in_axes=(0, steps_lib.Batch(None, None, 0), 0))
)
_split_seeds_eval_step = jax.jit(
  jax.vmap(steps_lib.eval_step, in_axes=(0, steps_lib.EvalBatch(None, None, 0)))
)


def train_node_runs_vmapped(
  model, config, graph, eval_batch, seeds, log, progress, checkpointer=None
) -> list[RunRecord]:
  """`train_node_run` for every seed at once, vmapped over the seeds.

  Each seed keeps its own initialisation and dropout keys (the same as the
  sequential runs'), its own validation selection, and its own record; the
  epoch time recorded per run is the batched epoch's divided by the number
  of seeds. The checkpointer saves the stacked states (latest, and each
  seed's selected one) and resumes them like a single run's.
  """
  train_batch = steps_lib.Batch(
    graph, eval_batch.labels, eval_batch.masks["train"]
  )
  keys = [jax.random.split(jax.random.key(seed)) for seed in seeds]
  init_keys = jnp.stack([k[0] for k in keys])
  dropout_keys = jnp.stack([k[1] for k in keys])
  states = jax.vmap(
    lambda key: state_lib.initial_train_state(
      config,
      model,
      graph,
      key,
      update_statistics=config.train.update_statistics,
    )
  )(init_keys)
  epochs = config.train.epochs
  finished = _finished_vmapped_runs(checkpointer, states)
  if finished is not None:
    progress.update(len(seeds) * epochs)
    return finished
  selectors = [_Selector(config.train.selection) for _ in seeds]
  selected, times, start_epoch = states, [], 0
  if checkpointer is not None:
    restored = checkpointer.restore_latest(states)
    if restored is not None:
      epoch, states, saved = restored
      start_epoch, times = epoch + 1, list(saved["times"])
      for selector, best in zip(selectors, saved["best"], strict=True):
        selector.best = tuple(best)
      selected = checkpointer.restore_best(states)
    log.drop(start_epoch)
  progress.update(len(seeds) * start_epoch)
  # Masks [n_seeds, n_nodes]: a split per seed (seed_eval_batch).
  seeds_train_step, seeds_eval_step = (
    (_split_seeds_train_step, _split_seeds_eval_step)
    if eval_batch.masks["train"].ndim == 2
    else (_seeds_train_step, _seeds_eval_step)
  )
  for epoch in range(start_epoch, epochs):
    rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_keys, epoch)

    def epoch_fn(states=states, rngs=rngs):
      new_states, train_metrics = seeds_train_step(states, train_batch, rngs)
      return new_states, train_metrics, seeds_eval_step(new_states, eval_batch)

    (states, train_metrics, sums), elapsed = timed(epoch_fn)
    times.append(elapsed / len(seeds))
    train_metrics, sums = jax.device_get((train_metrics, sums))
    moved = []
    for i, (seed, selector) in enumerate(zip(seeds, selectors, strict=True)):
      seed_train = seed_row(train_metrics, i)
      _refuse_non_finite(
        seed_train["loss"], f"seed {seed} at epoch {epoch}", checkpointer
      )
      metrics = steps_lib.summarize_eval([seed_row(sums, i)])
      previous = selector.best
      selector.update(epoch, metrics, None)
      moved.append(selector.best is not previous)
      log(
        seed=seed, epoch=epoch, train=seed_train, metrics=metrics, ms=times[-1]
      )
    if any(moved):
      selected = _take_rows(np.array(moved), states, selected)
      if checkpointer is not None:
        checkpointer.select(epoch, selected)
    if checkpointer is not None and checkpointer.due(epoch, epochs - 1):
      best = [list(selector.best) for selector in selectors]
      checkpointer.save(epoch, states, {"times": times, "best": best})
    progress.update(len(seeds))
  records = [
    RunRecord(
      selector.best[1],
      selector.best[2]["val"]["accuracy"],
      selector.best[2]["test"]["accuracy"],
      times,
      seed_row(selected, i),
      last_state=seed_row(states, i),
    )
    for i, selector in enumerate(selectors)
  ]
  if checkpointer is not None:
    checkpointer.finish(
      {
        "runs": [[r.best_epoch, r.val_acc, r.test_acc] for r in records],
        "times": times,
      }
    )
    checkpointer.close()
  return records


def seed_row(tree, i: int):
  """Seed `i`'s slice of a tree stacked over seeds."""
  return jax.tree.map(lambda x: x[i], tree)


def _take_rows(rows: np.ndarray, new, old):
  """Per leading index i, `new`'s slice where rows[i], else `old`'s."""

  def take(a, b):
    return jnp.where(q.per_row(rows, a.ndim), a, b)

  return jax.tree.map(take, new, old)


def _finished_vmapped_runs(checkpointer, template) -> list[RunRecord] | None:
  """The records of vmapped seeds a checkpointer saw finish, or None."""
  finished = _restore_finished(checkpointer, template)
  if finished is None:
    return None
  done, selected, last = finished
  return [
    RunRecord(
      best_epoch,
      val_acc,
      test_acc,
      done["times"],
      seed_row(selected, i),
      last_state=seed_row(last, i),
    )
    for i, (best_epoch, val_acc, test_acc) in enumerate(done["runs"])
  ]


def train_graph_run(
  model,
  config,
  dataset,
  fold,
  fold_index,
  budgets,
  seed,
  log,
  progress,
  checkpointer=None,
) -> RunRecord:
  rng = np.random.default_rng(seed)
  steps_per_epoch = -(-len(fold.train) // config.train.batch_size)
  key = jax.random.key(seed)
  init_key, dropout_key = jax.random.split(key)
  example = next(
    _graph_batches(dataset, fold.train, config, budgets, shuffle=False, rng=rng)
  )
  state = state_lib.initial_train_state(
    config,
    model,
    example.graph,
    init_key,
    steps_per_epoch=steps_per_epoch,
    loss=steps_lib.task_loss(config, dataset.task),
    target_affine=fold_target_affine(config, dataset, fold),
    update_statistics=config.train.update_statistics,
  )
  # Data parallel over several devices: the batch split, the state on all.
  mesh = data_parallel_mesh(config)
  place = _batch_placement(mesh)
  if place is not None:
    state = distributed.put_replicated(state, mesh)
  finished = finished_run(checkpointer, state)
  if finished is not None:
    progress.update(config.train.epochs)
    return finished
  eval_sets = {
    name: [
      steps_lib.EvalBatch(b.graph, b.labels, {name: b.mask})
      for b in _graph_batches(
        dataset, indices, config, budgets, shuffle=False, rng=rng, place=place
      )
    ]
    for name, indices in (("val", fold.val), ("test", fold.test))
  }
  loop = RunLoop(
    config, state, checkpointer, rng, name=f"fold {fold_index} seed {seed}"
  )
  if checkpointer is not None:
    log.drop(loop.start_epoch, seed=seed, fold=fold_index)
  progress.update(loop.start_epoch)
  state = loop.state
  for epoch in range(loop.start_epoch, config.train.epochs):
    batches = list(
      _graph_batches(
        dataset, fold.train, config, budgets, shuffle=True, rng=rng, place=place
      )
    )

    def epoch_fn(state=state, batches=batches, epoch=epoch):
      losses = []
      for i, batch in enumerate(batches):
        step_rng = jax.random.fold_in(dropout_key, epoch * 100_003 + i)
        state, step_metrics = steps_lib.train_step(state, batch, step_rng)
        losses.append(step_metrics["loss"])
      sums = [
        steps_lib.eval_step(state, b)
        for batches in eval_sets.values()
        for b in batches
      ]
      return state, jnp.mean(jnp.stack(losses)), sums

    (state, train_loss, sums), elapsed = timed(epoch_fn)
    metrics = steps_lib.summarize_eval(sums)
    log(
      seed=seed,
      fold=fold_index,
      epoch=epoch,
      train={"loss": train_loss},
      metrics=metrics,
      ms=elapsed,
    )
    loop.end_epoch(epoch, state, train_loss, metrics, elapsed)
    progress.update(1)
  return loop.record()


def fold_target_affine(config, dataset, fold):
  """Regression with `train.standardize_targets`: the mean and std of the
  fold's training targets; else None (the raw output)."""
  if dataset.task != "regression" or not config.train.standardize_targets:
    return None
  targets = np.asarray(dataset.labels, np.float64)[fold.train]
  return np.array([targets.mean(), max(targets.std(), 1e-6)], np.float32)


def _mixq_selection(config, state) -> tuple[dict[str, int], str]:
  """The searched widths and the config string that fixes them."""
  chosen = mixq.selected_widths(
    state.params, state_lib.quant_config(config).mixq
  )
  return chosen, ",".join(f"{name}={bits}" for name, bits in chosen.items())


class _StageLog:
  """A `MetricsLog` whose lines carry a MixQ stage (and drop only its)."""

  def __init__(self, log, stage: str):
    self.log, self.stage = log, stage

  def __call__(self, **row):
    self.log(stage=self.stage, **row)

  def drop(self, from_epoch: int, **ids) -> None:
    self.log.drop(from_epoch, stage=self.stage, **ids)


def train_mixq_node_run(
  config,
  num_classes,
  graph,
  eval_batch,
  seed,
  log,
  progress,
  checkpointer=None,
) -> RunRecord:
  """MixQ's node-task schedule (`frameworks.md` 4.2), for one seed.

  (a) the relaxed search, whose last epoch gives the widths; (b) the model
  in FP32; (c) from (b)'s best weights, quantizers calibrated on them, the
  fixed widths fine-tuned at `mixq.finetune_lr` without weight decay. The
  run's accuracy is (c)'s at its validation-selected epoch.

  `checkpointer(stage)` gives each stage its own checkpoints (or None), so
  a resumed run skips the finished stages.
  """

  def run(stage_config, stage, start_from=None):
    model = state_lib.create_model(
      stage_config, num_classes=num_classes, task="node"
    )
    return train_node_run(
      model,
      stage_config,
      graph,
      eval_batch,
      seed,
      _StageLog(log, stage),
      progress,
      start_from,
      checkpointer=None if checkpointer is None else checkpointer(stage),
    )

  settings = config.mixq
  search = run(
    config_lib.with_fields(config, {"train.epochs": settings.search_epochs}),
    "search",
  )
  # The widths of the finished search (its weights are not kept).
  chosen, selected = _mixq_selection(config, search.last_state)
  fp32 = run(
    config_lib.with_fields(
      config,
      {"quant.framework": "fp32", "train.epochs": settings.fp32_epochs},
    ),
    "fp32",
  )
  fixed_config = config_lib.with_fields(
    config,
    {
      "mixq.selected": selected,
      "train.epochs": settings.finetune_epochs,
      "train.learning_rate": settings.finetune_lr,
      "train.weight_decay": 0.0,
    },
  )
  start = {"params": fp32.state.params, "batch_stats": fp32.state.batch_stats}
  fixed = run(fixed_config, "fixed", start)
  return fixed._replace(extras={"mixq_selected_bits": chosen})


def train_mixq_graph_run(
  model,
  config,
  dataset,
  fold,
  fold_index,
  budgets,
  seed,
  log,
  progress,
  checkpointer=None,
) -> RunRecord:
  """MixQ's graph-task schedule: the search, then QAT of the fixed widths
  from scratch, each for `train.epochs` (`train_graph_run`'s signature,
  except that `checkpointer(stage)` gives each stage its checkpoints; each
  stage builds its own model)."""
  del model

  def run(stage_config, stage):
    model = state_lib.create_model(
      stage_config, num_classes=dataset.num_classes, task="graph"
    )
    return train_graph_run(
      model,
      stage_config,
      dataset,
      fold,
      fold_index,
      budgets,
      seed,
      _StageLog(log, stage),
      progress,
      checkpointer=None if checkpointer is None else checkpointer(stage),
    )

  search = run(config, "search")
  # As the reference: the search model of lowest validation loss.
  chosen, selected = _mixq_selection(config, search.state)
  fixed = run(
    config_lib.with_fields(config, {"mixq.selected": selected}), "fixed"
  )
  return fixed._replace(extras={"mixq_selected_bits": chosen})


def epochs_per_run(config) -> int:
  """Epochs one run trains, over all of its framework's stages."""
  if config.quant.framework != "mixq":
    return config.train.epochs
  if data_lib.is_node_dataset(config.dataset):
    settings = config.mixq
    return (
      settings.search_epochs + settings.fp32_epochs + settings.finetune_epochs
    )
  return 2 * config.train.epochs


class MetricsLog:
  """Appends one JSON line per epoch to `metrics.jsonl` in the workdir."""

  def __init__(self, path: pathlib.Path, *, append: bool = False):
    self.path = path
    self.file = open(path, "a" if append else "w")  # noqa: SIM115

  def drop(self, from_epoch: int, **ids) -> None:
    """Forgets a resumed run's lines from `from_epoch` on (rewritten)."""
    self.file.close()
    kept = [
      line
      for line in self.path.read_text().splitlines()
      if not _same_run_from(json.loads(line), from_epoch, ids)
    ]
    self.path.write_text("".join(line + "\n" for line in kept))
    self.file = open(self.path, "a")  # noqa: SIM115

  def __call__(self, *, train, metrics, ms, **ids):
    row = dict(ids)
    row["train_loss"] = float(train["loss"])
    suffixes = {"accuracy": "acc", "mae": "mae"}
    row.update(
      {
        f"train_{suffixes[k]}": float(v)
        for k, v in train.items()
        if k != "loss"
      }
    )
    for split, values in metrics.items():
      row.update(
        {f"{split}_{suffixes.get(k, k)}": v for k, v in values.items()}
      )
    row["epoch_ms"] = round(ms, 3)
    self.file.write(json.dumps(row) + "\n")
    # Flushed per line: a killed run keeps every epoch it logged.
    self.file.flush()

  def close(self):
    self.file.close()


def _same_run_from(row: dict, from_epoch: int, ids: dict) -> bool:
  same_run = all(row.get(key) == value for key, value in ids.items())
  return same_run and row["epoch"] >= from_epoch
