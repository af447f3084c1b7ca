"""Training runs: batches, the training loops and `train_and_evaluate`."""

import functools
import importlib.metadata
import json
import math
import numbers
import os
import pathlib
import subprocess
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

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
  distributed,
  layers,
  mixq,
  models,
)
from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
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
    if criterion not in SELECTIONS:
      raise ValueError(f"selection={criterion!r} is not one of {SELECTIONS}")
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


def _timed(fn):
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return result, (time.perf_counter() - start) * 1e3


class _RunLoop:
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


def _finished_run(checkpointer, template) -> RunRecord | None:
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


def _train_node_run(
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
  finished = _finished_run(checkpointer, state)
  if finished is not None:
    progress.update(config.train.epochs)
    return finished
  loop = _RunLoop(config, state, checkpointer, name=f"seed {seed}")
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

    (state, train_metrics, sums), elapsed = _timed(epoch_fn)
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


def _train_node_runs_vmapped(
  model, config, graph, eval_batch, seeds, log, progress, checkpointer=None
) -> list[RunRecord]:
  """`_train_node_run` for every seed at once, vmapped over the seeds.

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

    (states, train_metrics, sums), elapsed = _timed(epoch_fn)
    times.append(elapsed / len(seeds))
    train_metrics, sums = jax.device_get((train_metrics, sums))
    moved = []
    for i, (seed, selector) in enumerate(zip(seeds, selectors, strict=True)):
      seed_train = _seed_row(train_metrics, i)
      _refuse_non_finite(
        seed_train["loss"], f"seed {seed} at epoch {epoch}", checkpointer
      )
      metrics = steps_lib.summarize_eval([_seed_row(sums, i)])
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
      _seed_row(selected, i),
      last_state=_seed_row(states, i),
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


def _seed_row(tree, i: int):
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
      _seed_row(selected, i),
      last_state=_seed_row(last, i),
    )
    for i, (best_epoch, val_acc, test_acc) in enumerate(done["runs"])
  ]


def _train_graph_run(
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
    target_affine=_target_affine(config, dataset, fold),
    update_statistics=config.train.update_statistics,
  )
  # Data parallel over several devices: the batch split, the state on all.
  mesh = data_parallel_mesh(config)
  place = _batch_placement(mesh)
  if place is not None:
    state = distributed.put_replicated(state, mesh)
  finished = _finished_run(checkpointer, state)
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
  loop = _RunLoop(
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

    (state, train_loss, sums), elapsed = _timed(epoch_fn)
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


def _target_affine(config, dataset, fold):
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
  """A `_MetricsLog` whose lines carry a MixQ stage (and drop only its)."""

  def __init__(self, log, stage: str):
    self.log, self.stage = log, stage

  def __call__(self, **row):
    self.log(stage=self.stage, **row)

  def drop(self, from_epoch: int, **ids) -> None:
    self.log.drop(from_epoch, stage=self.stage, **ids)


def _train_mixq_node_run(
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
    return _train_node_run(
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


def _train_mixq_graph_run(
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
  from scratch, each for `train.epochs` (`_train_graph_run`'s signature,
  except that `checkpointer(stage)` gives each stage its checkpoints; each
  stage builds its own model)."""
  del model

  def run(stage_config, stage):
    model = state_lib.create_model(
      stage_config, num_classes=dataset.num_classes, task="graph"
    )
    return _train_graph_run(
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


class _MetricsLog:
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


def _validate(config) -> None:
  """Refuses bad settings before any data is read or anything compiled."""
  state_lib.quant_config(config)
  state_lib.prompt_config(config)
  # The class count is the data's; every other field is checked here.
  task = "node" if data_lib.is_node_dataset(config.dataset) else "graph"
  state_lib.model_config(config, num_classes=1, task=task)
  if config.train.selection not in SELECTIONS:
    raise ValueError(
      f"selection={config.train.selection!r} is not one of {SELECTIONS}"
    )
  trainable, known = config.train.trainable, state_lib.TRAINABLE
  if trainable not in known:
    raise ValueError(f"train.trainable={trainable!r} is not one of {known}")
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
  for _, _, section, field in state_lib._hyperparameter_paths(config):
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
  if sampler not in config_lib.SAMPLERS:
    raise ValueError(
      f"train.sampler={sampler!r} is not one of {config_lib.SAMPLERS}"
    )
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
  _validate(config)
  # Read now: a commit made while a long run trains must not be credited
  # with its result.
  version = code_version()
  workdir = pathlib.Path(workdir).absolute()
  staged = config.quant.framework == "mixq"
  checkpointed = config.checkpoint.enabled
  _prepare_workdir(config, workdir, resume=resume, checkpointed=checkpointed)
  dataset = data_lib.load_dataset(
    config.dataset, config.data_dir or None, **_dataset_options(config)
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
  log = _MetricsLog(workdir / "metrics.jsonl", append=resume)
  records: list[RunRecord] = []
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
      graph, eval_batch = node_inputs(dataset, config)
      total = config.seeds * epochs_per_run(config)
      with tqdm.tqdm(total=total, disable=not progress, unit="ep") as bar:
        if config.vmap_seeds and not staged:
          bar.set_description(f"{config.seeds} seeds, vmapped")
          records = _train_node_runs_vmapped(
            model,
            config,
            graph,
            seed_eval_batch(dataset, eval_batch, list(seeds)),
            list(seeds),
            log,
            bar,
            checkpointer=checkpointer("seeds_vmapped"),
          )
        else:
          for seed in seeds:
            bar.set_description(f"seed {seed}")
            seed_batch = seed_eval_batch(dataset, eval_batch, seed)
            if staged:
              record = _train_mixq_node_run(
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
              record = _train_node_run(
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
      folds = _selected_folds(config, dataset)
      budgets = data_lib.make_budgets(
        dataset.graphs,
        config.train.batch_size,
        shards=data_parallel_mesh(config).size,
        growth=config.train.padding_growth,
      )
      total = len(folds) * config.seeds * epochs_per_run(config)
      run_graph, run_checkpointer = (
        (_train_mixq_graph_run, stage_checkpointers)
        if staged
        else (_train_graph_run, checkpointer)
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
  summary = _summary(config, dataset, records, node_task, version)
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


def _selected_folds(config, dataset) -> list[tuple[int, data_lib.Fold]]:
  """(index, fold) of the config's folds, refusing ones the dataset lacks."""
  first = config.get("first_fold", 0)
  if first + config.folds > len(dataset.folds):
    raise ValueError(
      f"first_fold={first} with folds={config.folds} asks for folds {first}.."
      f"{first + config.folds - 1}, but {config.dataset} has "
      f"{len(dataset.folds)} (0..{len(dataset.folds) - 1})"
    )
  return list(enumerate(dataset.folds))[first : first + config.folds]


def _prepare_workdir(config, workdir, *, resume, checkpointed) -> None:
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
    differences = _config_differences(
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


def _config_differences(saved: dict, current: dict, prefix="") -> list[str]:
  """'key: saved -> now' for every field that differs, aside from the data
  directory and how often checkpoints are written."""
  differences = []
  for key in sorted(set(saved) | set(current)):
    path = f"{prefix}{key}"
    old, new = saved.get(key), current.get(key)
    if path in _RESUMABLE_CHANGES or old == new:
      continue
    if isinstance(old, dict) and isinstance(new, dict):
      differences += _config_differences(old, new, f"{path}.")
    else:
      differences.append(f"{path}: saved {old!r}, now {new!r}")
  return differences


def _dataset_options(config) -> dict:
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
    graph, _ = node_inputs(dataset, config)
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


def _summary(config, dataset, records, node_task, version) -> dict:
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
