"""Hyper-parameter sweeps as one vmapped, jit-compiled program per structure.

Numeric hyper-parameters (seed, learning rates, weight decay, bit width)
are arrays: a whole grid of them trains at once as
``jax.jit(jax.vmap(run_one))(points)``, where `run_one` initialises from
its seed, writes its learning rates and weight decay into the optimizer's
injected hyper-parameters, and scans over the epochs (train step, then
evaluation, then the validation selection), all inside one program.
Structural choices (prompt rank, number of prompts, hidden width, layers)
change shapes, so they loop in Python with one compile each. Graph
datasets run each point on every fold, their mini-batches gathered inside
the program (`graph_sweep`).

A swept configuration follows `train_and_evaluate`'s run: the same keys
(``split(key(seed))``, ``fold_in(dropout_key, epoch)``), the same steps and
the same selection rule (the first epoch of best validation accuracy, or of
lowest validation loss). Unvmapped, `run_one` reproduces the library's run
exactly on CPU. The batched program is compiled differently (XLA fuses and
orders the same arithmetic differently for [chunk, ...] shapes), so its
floats can differ in the last bit: FP32 runs agree to that rounding, while
in quantized training such a bit can move a value across a rounding
boundary, after which the run follows a different, equally valid
trajectory (like another summation order would).
"""

import collections
import csv
import dataclasses
import itertools
import json
import math
import numbers
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import PartitionSpec as P

from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import distributed
from lorap_jax._src import quantization as q
from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train as train_lib
from lorap_jax._src import train_state as state_lib

# Numeric axes: arrays inside one compiled program.
NUMERIC_AXES = (
  "seed",
  "learning_rate",
  "prompt_learning_rate",
  "weight_decay",
  "bits",
)
# Structural axes -> the config field each sets (one compile per value).
STRUCTURAL_AXES = {
  "rank": "prompt.rank",
  "num_prompts": "prompt.num_prompts",
  "hidden": "model.hidden",
  "num_layers": "model.num_layers",
}
# Where a numeric axis takes its value when the grid leaves it out.
_CONFIG_FIELDS = {
  "learning_rate": "train.learning_rate",
  "prompt_learning_rate": "prompt.learning_rate",
  "weight_decay": "train.weight_decay",
  "bits": "quant.bits",
}
AXES = NUMERIC_AXES + tuple(STRUCTURAL_AXES)
_INTEGER_AXES = ("seed", "bits", *STRUCTURAL_AXES)
# Frameworks whose bit width also sets static settings (Degree-Quant's INT4
# defaults): their bits loop in Python like a structural axis.
_STATIC_BITS_FRAMEWORKS = ("dq",)
SWEEP_FRAMEWORKS = ("fp32", "qat", "dq", "a2q")

CSV_NAME = "sweep.csv"
BEST_NAME = "best.json"
# Calls dispatched ahead of the one whose results are read, so the host
# builds rows while the next call runs. Each holds its own buffers; more
# in flight measured no faster on the 2-core CPU.
_IN_FLIGHT = 1


@dataclasses.dataclass(frozen=True)
class SweepGrid:
  """The values of each swept axis; the grid is their cartesian product.

  An axis left out (None) takes the config's value; `seed` then runs
  ``range(config.seeds)``.

  Attributes:
    seed: run seeds (integers >= 0).
    learning_rate: backbone learning rates (`train.learning_rate`).
    prompt_learning_rate: prompt learning rates (`prompt.learning_rate`).
    weight_decay: backbone L2 weight decay (`train.weight_decay`).
    bits: bit widths, integers in 1..16 (`quant.bits`).
    rank: LoRAP ranks r (structural).
    num_prompts: prompt counts k (structural).
    hidden: hidden widths (structural).
    num_layers: message-passing layers (structural).

  Examples:
    >>> grid = SweepGrid.from_axes({"seed": [0, 1], "learning_rate": [0.01]})
    >>> grid.seed, grid.learning_rate
    ((0, 1), (0.01,))
  """

  seed: tuple[int, ...] | None = None
  learning_rate: tuple[float, ...] | None = None
  prompt_learning_rate: tuple[float, ...] | None = None
  weight_decay: tuple[float, ...] | None = None
  bits: tuple[int, ...] | None = None
  rank: tuple[int, ...] | None = None
  num_prompts: tuple[int, ...] | None = None
  hidden: tuple[int, ...] | None = None
  num_layers: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in AXES:
      values = getattr(self, name)
      if values is not None:
        object.__setattr__(self, name, _checked_axis(name, values))

  @classmethod
  def from_axes(cls, axes: Mapping[str, Sequence[Any]]) -> "SweepGrid":
    """A grid from ``{axis name: values}``.

    Raises:
      ValueError: on an unknown axis name, an empty axis, or a bad value.
    """
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
      raise ValueError(
        f"unknown sweep axes {unknown}; known axes: {', '.join(AXES)}"
      )
    return cls(**dict(axes))

  def resolve(self, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """Every axis's values, the config's where the grid leaves one out."""
    values = {}
    for name in AXES:
      given = getattr(self, name)
      if given is not None:
        values[name] = given
      elif name == "seed":
        values[name] = tuple(range(config.seeds))
      else:
        path = _CONFIG_FIELDS.get(name) or STRUCTURAL_AXES[name]
        values[name] = (_config_value(config, path),)
    return values


def _checked_axis(name: str, values) -> tuple:
  """The axis as a tuple of Python numbers; refuses bad values."""
  if isinstance(values, str | bytes) or not isinstance(values, Sequence):
    raise ValueError(f"sweep axis {name!r} must be a list of numbers")
  values = tuple(values)
  if not values:
    raise ValueError(f"sweep axis {name!r} is empty; give at least one value")
  checked = []
  for value in values:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ValueError(
        f"sweep axis {name!r} has the non-numeric value {value!r}"
      )
    value = float(value)
    if not math.isfinite(value):
      raise ValueError(f"sweep axis {name!r} has the non-finite value {value}")
    if name in _INTEGER_AXES:
      if value != round(value):
        raise ValueError(f"sweep axis {name!r} takes integers, not {value}")
      value = int(value)
    checked.append(value)
  if name == "bits":
    try:
      q.check_bits(checked)
    except ValueError as error:
      raise ValueError(f"sweep axis 'bits': {error}") from error
  minimum = 1 if name in STRUCTURAL_AXES else 0
  low = [v for v in checked if v < minimum]
  if low:
    raise ValueError(f"sweep axis {name!r} has values below {minimum}: {low}")
  if name == "seed" and max(checked) >= 2**32:
    raise ValueError(f"sweep axis 'seed' takes values below 2**32: {checked}")
  if len(set(checked)) != len(checked):
    raise ValueError(f"sweep axis {name!r} repeats values: {checked}")
  return tuple(checked)


def _config_value(config, path: str):
  node = config
  for name in path.split("."):
    node = node[name]
  return node


# ---------------------------------------------------------------------------
# One run as a pure function of its numeric hyper-parameters.
# ---------------------------------------------------------------------------


class SweepPoint(NamedTuple):
  """The numeric hyper-parameters of one run (scalars, or [n] stacked)."""

  seed: jax.Array  # uint32
  learning_rate: jax.Array  # float32
  prompt_learning_rate: jax.Array  # float32
  weight_decay: jax.Array  # float32
  bits: jax.Array  # float32


class SweepMetrics(NamedTuple):
  """What one swept run reports (scalars, or [n] stacked).

  Counts and sums are at the selected epoch (`train.selection`); divided by
  the split's size on the host they give the accuracy (classification),
  mean absolute error (regression) and mean loss that `train_and_evaluate`
  reports. A run whose training loss stops being finite keeps the
  selection of the epochs before (`train_and_evaluate` would stop there).
  """

  best_epoch: jax.Array  # int32
  val_correct: jax.Array  # int32; 0 in regression
  val_loss_sum: jax.Array
  test_correct: jax.Array  # int32; 0 in regression
  train_loss: jax.Array  # after the last epoch
  diverged_epoch: jax.Array  # int32, first non-finite loss; -1: none
  val_error_sum: jax.Array  # regression: sum of |error|; 0 otherwise
  test_error_sum: jax.Array


def point_hyperparameters(point: SweepPoint) -> dict:
  """The optimizer values a point sets (`train_state.with_hyperparameters`)."""
  return {
    "backbone": {
      "learning_rate": point.learning_rate,
      "weight_decay": point.weight_decay,
    },
    "prompt": {"learning_rate": point.prompt_learning_rate},
  }


class Selection(NamedTuple):
  """A scanned run's validation selection so far (scalars)."""

  best_epoch: jax.Array  # int32
  score: jax.Array  # what the selection maximises
  val_correct: jax.Array  # int32
  val_loss_sum: jax.Array
  test_correct: jax.Array  # int32
  val_error_sum: jax.Array
  test_error_sum: jax.Array
  alive: jax.Array  # bool: every loss so far finite
  diverged_epoch: jax.Array  # int32, first non-finite loss; -1: none


def initial_selection() -> Selection:
  """The selection before the first epoch."""
  zero = jnp.zeros((), jnp.int32)
  return Selection(
    best_epoch=zero,
    score=jnp.full((), -jnp.inf),
    val_correct=zero,
    val_loss_sum=jnp.zeros(()),
    test_correct=zero,
    val_error_sum=jnp.zeros(()),
    test_error_sum=jnp.zeros(()),
    alive=jnp.ones((), bool),
    diverged_epoch=jnp.full((), -1, jnp.int32),
  )


def update_selection(
  selection: Selection, epoch, loss, val, test, *, criterion: str
) -> Selection:
  """The selection after `epoch`, from its training loss and the validation
  and test sums of `steps.eval_step` ("loss_sum", and "correct" or
  "abs_error").

  The same rule as `train_and_evaluate`'s on host (`criterion`, one of
  `runs.SELECTIONS`): the first epoch of best validation accuracy (correct
  counts, the count is fixed), of lowest validation loss (loss sums) or of
  lowest validation MAE (absolute-error sums), so the float64 division
  there cannot break a tie differently. Epochs from the first non-finite
  loss on are left out (`train_and_evaluate` would stop there).
  """
  finite = jnp.isfinite(loss)
  diverged = jnp.where(
    selection.alive & ~finite, epoch, selection.diverged_epoch
  )
  alive = selection.alive & finite
  no_count, no_error = jnp.zeros((), jnp.int32), jnp.zeros(())
  val_correct = val.get("correct", no_count)
  val_error = val.get("abs_error", no_error)
  score = {
    "val_acc": val_correct.astype(float),
    "val_loss": -val["loss_sum"],
    "val_mae": -val_error,
  }[criterion]
  better = alive & ((epoch == 0) | (score > selection.score))
  candidate = Selection(
    best_epoch=epoch,
    score=score,
    val_correct=val_correct,
    val_loss_sum=val["loss_sum"],
    test_correct=test.get("correct", no_count),
    val_error_sum=val_error,
    test_error_sum=test.get("abs_error", no_error),
    alive=alive,
    diverged_epoch=diverged,
  )
  kept = selection._replace(alive=alive, diverged_epoch=diverged)
  return jax.tree.map(
    lambda new, old: jnp.where(better, new, old), candidate, kept
  )


def selection_metrics(selection: Selection, last_loss) -> SweepMetrics:
  """What a run reports from its final selection."""
  return SweepMetrics(
    best_epoch=selection.best_epoch,
    val_correct=selection.val_correct,
    val_loss_sum=selection.val_loss_sum,
    test_correct=selection.test_correct,
    train_loss=last_loss,
    diverged_epoch=selection.diverged_epoch,
    val_error_sum=selection.val_error_sum,
    test_error_sum=selection.test_error_sum,
  )


def make_sweep_run(
  config: ml_collections.ConfigDict, model
) -> Callable[..., SweepMetrics]:
  """`run_one(point, graph, eval_batch) -> SweepMetrics` for one structure.

  `run_one` trains one run from scratch: initialisation from
  ``point.seed``, the point's hyper-parameters written into the optimizer
  state, then a `lax.scan` over `train.epochs` epochs of `train_step`,
  `eval_step` and the validation selection. It is pure and traceable:
  `jax.jit` it for one run, or `jax.vmap` it over stacked points with the
  graph and batch broadcast (``in_axes=(0, None, None)``; masks stacked
  per run, ``EvalBatch(None, None, 0)``, where each seed has its split).

  Args:
    config: the structure's config (epochs, selection, optimizer groups).
    model: the model `train_state.create_model(config, ...)` built.

  Returns:
    `run_one`, taking a `SweepPoint`, the graph and the `EvalBatch` of
    `runs.node_inputs`.
  """
  epochs = config.train.epochs
  criterion = config.train.selection

  def run_one(point: SweepPoint, graph, eval_batch) -> SweepMetrics:
    train_batch = steps_lib.Batch(
      graph, eval_batch.labels, eval_batch.masks["train"]
    )
    init_key, dropout_key = jax.random.split(jax.random.key(point.seed))
    state = state_lib.initial_train_state(
      config, model, graph, init_key, bits=point.bits
    )
    state = state.replace(
      opt_state=state_lib.with_hyperparameters(
        state.opt_state, point_hyperparameters(point)
      )
    )

    def epoch_fn(carry, epoch):
      state, selection = carry
      rng = jax.random.fold_in(dropout_key, epoch)
      state, train_metrics = steps_lib.train_step(state, train_batch, rng)
      sums = steps_lib.eval_step(state, eval_batch)
      loss = train_metrics["loss"]
      selection = update_selection(
        selection, epoch, loss, sums["val"], sums["test"], criterion=criterion
      )
      return (state, selection), loss

    (state, selection), losses = jax.lax.scan(
      epoch_fn,
      (state, initial_selection()),
      jnp.arange(epochs, dtype=jnp.int32),
    )
    return selection_metrics(selection, losses[-1])

  return run_one


# ---------------------------------------------------------------------------
# The driver: structures in Python, numeric points vmapped in chunks.
# ---------------------------------------------------------------------------


class SweepResult(NamedTuple):
  """What `run_sweep` returns (and writes to its workdir).

  Attributes:
    rows: one dict per run, in grid order (graph datasets: a run per
      configuration and fold, the folds outermost, grouped by steps per
      epoch where folds differ in it): every axis's value,
      the fold (graph datasets), then best_epoch, val_acc, val_loss,
      test_acc, train_loss and diverged_epoch (the `sweep.csv` rows).
    best: the best configuration's row by validation accuracy (ties: lower
      validation loss, then grid order).
    best_mean: the best hyper-parameters by validation accuracy averaged
      over seeds (and folds, for graph datasets): the axis values (without
      the seed), the runs' seeds (and folds), and the mean and sample std
      of val_acc and test_acc.
    compile_seconds: per compiled program (one per structural value; a
      graph dataset whose folds differ in steps per epoch compiles one per
      step count), the seconds it took to compile.
    run_seconds: per compiled program, the seconds its chunks took.
  """

  rows: list[dict[str, Any]]
  best: dict[str, Any]
  best_mean: dict[str, Any]
  compile_seconds: list[float]
  run_seconds: list[float]


def check_sweep_config(config: ml_collections.ConfigDict) -> None:
  """Refuses configs the vmapped sweep does not cover.

  Raises:
    NotImplementedError: MixQ (staged runs) and neighbour-sampled training.
    ValueError: anything `train_and_evaluate` would refuse.
  """
  if config.quant.framework not in SWEEP_FRAMEWORKS:
    raise NotImplementedError(
      f"lorap sweep covers the frameworks {SWEEP_FRAMEWORKS}; "
      f"{config.quant.framework!r} trains in stages, run it with `lorap train`"
    )
  if config.train.get("sampler", "full") != "full":
    raise NotImplementedError(
      "lorap sweep trains full-batch node tasks and mini-batched graph "
      f"tasks; train.sampler={config.train.sampler!r} runs with `lorap train`"
    )
  train_lib.validate_config(config)
  node = data_lib.is_node_dataset(config.dataset)
  allowed = ("val_acc", "val_loss") if node else runs_lib.SELECTIONS
  if config.train.selection not in allowed:
    raise ValueError(
      f"selection={config.train.selection!r} is not one of {allowed} "
      f"for {config.dataset!r}"
    )


# The prompt kinds whose modules read each structural prompt axis.
_PROMPTS_READING = {
  "rank": ("lorap", "gpf-lorap"),
  "num_prompts": ("gpf-plus", "lorap", "gpf-lorap"),
}


def _check_grid_for_config(config, values: Mapping[str, tuple]) -> None:
  swept = {name for name, v in values.items() if len(v) > 1}
  if config.quant.framework == "fp32" and "bits" in swept:
    raise ValueError("sweep axis 'bits' has no effect with framework fp32")
  if config.train.trainable == "prompts" and swept & {
    "learning_rate",
    "weight_decay",
  }:
    raise ValueError(
      "sweep axes 'learning_rate' and 'weight_decay' have no effect with "
      "train.trainable='prompts'"
    )
  for axis, kinds in _PROMPTS_READING.items():
    if axis in swept and config.prompt.kind not in kinds:
      raise ValueError(
        f"sweep axis {axis!r} has no effect with prompt "
        f"{config.prompt.kind!r}; only {', '.join(kinds)} read it"
      )


def _structural_names(config) -> tuple[str, ...]:
  names = tuple(STRUCTURAL_AXES)
  if config.quant.framework in _STATIC_BITS_FRAMEWORKS:
    names += ("bits",)
  return names


def grid_points(values: Mapping[str, tuple], numeric: Sequence[str]) -> list:
  """The cartesian product of the numeric axes, as a list of dicts."""
  return [
    dict(zip(numeric, combo, strict=True))
    for combo in itertools.product(*(values[name] for name in numeric))
  ]


def padded_chunk(points: Sequence[Mapping[str, Any]], size: int) -> list:
  """`points` with the last repeated to `size` (the padding of a chunk)."""
  return list(points) + [points[-1]] * (size - len(points))


def stacked_points(
  points: Sequence[Mapping[str, Any]], size: int
) -> SweepPoint:
  """Points stacked to `size` rows; the last is repeated as padding."""
  padded = padded_chunk(points, size)

  def column(name, dtype):
    return np.asarray([p[name] for p in padded], dtype)

  return SweepPoint(
    seed=column("seed", np.uint32),
    learning_rate=column("learning_rate", np.float32),
    prompt_learning_rate=column("prompt_learning_rate", np.float32),
    weight_decay=column("weight_decay", np.float32),
    bits=column("bits", np.float32),
  )


class _NodeTask:
  """What a node dataset's sweep feeds its program, per chunk and run.

  The graph and evaluation batch are the same for every run. A fixed split
  (Planetoid) is one batch for every run; a dataset that draws a split per
  seed (`dataset.random_split`, e.g. Amazon) gets masks stacked per run,
  ``[chunk, n_nodes]``, as `train_and_evaluate` gives each seed its own
  split.
  """

  kind = "node"
  regression = False

  def __init__(self, config, dataset, mesh):
    self.dataset = dataset
    self.mesh = mesh
    graph, eval_batch = runs_lib.node_inputs(dataset, config)
    self.graph, self.eval_batch = distributed.put_replicated(
      (graph, eval_batch), mesh
    )
    self.per_seed = bool(getattr(dataset, "random_split", False))
    # Masks with a leading axis: each run has its seed's split.
    batch_axes = steps_lib.EvalBatch(None, None, 0) if self.per_seed else None
    self.in_axes = (0, None, batch_axes)
    self._masks: dict[int, dict[str, np.ndarray]] = {}

  def points(self, values, numeric) -> list[dict[str, Any]]:
    return grid_points(values, numeric)

  def groups(self, points) -> list[list[dict[str, Any]]]:
    """Points that share a compiled program: all of them."""
    return [points]

  def make_run(self, config, model):
    return make_sweep_run(config, model)

  def masks(self, seed: int) -> Mapping[str, np.ndarray]:
    if not self.per_seed:
      return self.eval_batch.masks
    if seed not in self._masks:
      split = self.dataset.split_for_seed(seed)
      self._masks[seed] = {
        name: np.asarray(getattr(split, f"{name}_mask"))
        for name in ("train", "val", "test")
      }
    return self._masks[seed]

  def counts(self, point) -> dict[str, int]:
    masks = self.masks(point["seed"])
    return {name: max(int(np.sum(masks[name])), 1) for name in ("val", "test")}

  def row_fields(self, point) -> dict[str, Any]:
    return {}

  def args(self, chunk, size: int) -> tuple:
    """(points, graph, evaluation batch) of a chunk, stacked to `size`."""
    batch = self.eval_batch
    if self.per_seed:
      seeds = [p["seed"] for p in padded_chunk(chunk, size)]
      masks = {
        name: np.stack([self.masks(seed)[name] for seed in seeds])
        for name in ("train", "val", "test")
      }
      batch = batch._replace(masks=masks)
    return (stacked_points(chunk, size), self.graph, batch)


def _overridden(config, assignment: Mapping[str, Any]):
  """`config` with each grid axis of `assignment` set to its value."""
  return config_lib.with_fields(
    config,
    {
      STRUCTURAL_AXES.get(name) or _CONFIG_FIELDS[name]: value
      for name, value in assignment.items()
    },
  )


def run_sweep(
  config: ml_collections.ConfigDict,
  grid: SweepGrid | Mapping[str, Sequence[Any]],
  workdir: str | os.PathLike | None = None,
  *,
  chunk_size: int | None = None,
  devices: int | Sequence[jax.Device] | None = None,
  progress: bool = False,
) -> SweepResult:
  """Trains every configuration of a grid; numeric axes vmapped in chunks.

  Per structure (each combination of the structural axes' values) the
  numeric points train as one `jax.jit(jax.vmap(run_one))` program, called
  once per chunk of `chunk_size` points (the last chunk padded, so one
  compile serves them all). With ``chunk_size=1`` the program is
  `jax.jit(run_one)` itself, still compiled once and called per point
  (exactly `train_and_evaluate`'s numbers on CPU for node datasets). Each
  configuration is the run `train_and_evaluate` would do for its config
  and seed; the sweep writes no checkpoints or per-epoch logs.

  Graph datasets (classification) run every point on each of the config's
  folds (`config.folds` from `config.first_fold`), a row per fold; the
  mini-batches are gathered inside the program (`graph_sweep`), and the
  best configuration is chosen on the mean over seeds and folds.

  On a CPU, batching does not pay for these models: the gathers and
  scatter-adds of message passing dominate, and XLA runs them no faster
  per configuration batched than alone (README, *Sweeps*), so the default
  there is one configuration per device per call.

  Several devices split each call's configurations evenly along the mesh
  axis ``"config"`` (`jax.shard_map`); a device with one configuration
  runs `run_one` unvmapped, so each configuration gives the numbers it
  gives alone on one device.

  Args:
    config: the base config (framework fp32, qat, dq or a2q). Fields a grid
      axis leaves out keep the config's value.
    grid: a `SweepGrid`, or ``{axis: values}`` (see `AXES`).
    workdir: where to write `sweep.csv`, `best.json` and `config.json`
      (created); None writes nothing.
    chunk_size: configurations per compiled call (memory grows with it),
      rounded up to a multiple of the device count; None: one per device
      on a CPU, else all of a structure's points in one call.
    devices: the devices to spread configurations over: None or 0 for all
      that JAX sees, a count (the first ones), or a list of devices.
    progress: show a progress bar over configurations on stderr.

  Returns:
    A `SweepResult`.

  Raises:
    ValueError: on a bad grid (unknown or empty axis, non-numeric values,
      bits outside 1..16) or config, or a chunk size below 1.
    NotImplementedError: MixQ and neighbour sampling.
  """
  if not isinstance(grid, SweepGrid):
    grid = SweepGrid.from_axes(grid)
  if chunk_size is not None and (
    isinstance(chunk_size, bool)
    or not isinstance(chunk_size, int)
    or chunk_size < 1
  ):
    raise ValueError(f"{chunk_size=} must be an integer >= 1 or None")
  check_sweep_config(config)
  mesh = distributed.device_mesh(distributed.CONFIG_AXIS, devices)
  values = grid.resolve(config)
  _check_grid_for_config(config, values)
  structural = _structural_names(config)
  numeric = tuple(name for name in NUMERIC_AXES if name not in structural)
  structures = grid_points(values, structural)
  # Every structure must build before anything trains.
  configs = [_overridden(config, s) for s in structures]
  for structure_config in configs:
    train_lib.validate_config(structure_config)
  workdir = _prepare(workdir, config)

  dataset = data_lib.load_dataset(
    config.dataset,
    config.data_dir or None,
    **train_lib.dataset_options(config),
  )
  if isinstance(dataset, data_lib.NodeDataset):
    task = _NodeTask(config, dataset, mesh)
  else:
    # Imported here: it builds on this module.
    from lorap_jax._src import graph_sweep

    task = graph_sweep.GraphTask(config, dataset, mesh, values)
  points = task.points(values, numeric)
  if chunk_size is None:
    chunk_size = 1 if jax.default_backend() == "cpu" else len(points)
  size = distributed.round_up_to(min(chunk_size, len(points)), mesh.size)
  rows, compile_seconds, run_seconds = [], [], []
  total = len(structures) * len(points)
  with tqdm.tqdm(total=total, disable=not progress, unit="run") as bar:
    for structure, structure_config in zip(structures, configs, strict=True):
      model = state_lib.create_model(
        structure_config, num_classes=dataset.num_classes, task=task.kind
      )
      data_lib.validate_prompt_sizes(
        model.prompt,
        input_width=dataset.num_features,
        aggregate_widths=model.aggregate_widths(dataset.num_features),
      )
      for group in task.groups(points):
        full = [{**point, **structure} for point in group]
        chunks = [full[i : i + size] for i in range(0, len(full), size)]
        run_chunk, seconds = _compile(
          task.make_run(structure_config, model),
          _placed(task.args(chunks[0], size), task.in_axes, mesh),
          task.in_axes,
          mesh,
        )
        compile_seconds.append(seconds)
        start = time.perf_counter()
        pending = collections.deque()
        for chunk in chunks:
          args = _placed(task.args(chunk, size), task.in_axes, mesh)
          # Dispatch is asynchronous: the next calls queue while this runs.
          pending.append((chunk, run_chunk(*args)))
          if len(pending) > _IN_FLIGHT:
            rows += _collect(*pending.popleft(), task, bar)
        while pending:
          rows += _collect(*pending.popleft(), task, bar)
        run_seconds.append(time.perf_counter() - start)
  best, best_mean = select_best(rows)
  result = SweepResult(rows, best, best_mean, compile_seconds, run_seconds)
  # Multi-host: every process holds the rows; process 0 writes them.
  if workdir is not None and distributed.is_writer():
    write_results(result, workdir)
  return result


def _collect(chunk, outputs, task, bar) -> list[dict[str, Any]]:
  """The CSV rows of a finished call (waits for its results)."""
  metrics = jax.device_get(outputs)
  if np.ndim(metrics.best_epoch) == 0:  # One unvmapped run.
    metrics = jax.tree.map(lambda x: np.asarray(x)[None], metrics)
  rows = []
  for i, point in enumerate(chunk):
    row = {name: point[name] for name in AXES}
    row.update(task.row_fields(point))
    row.update(_row_metrics(metrics, i, task.counts(point), task.regression))
    rows.append(row)
  bar.update(len(rows))
  return rows


def _per_run(in_axes, args, fn):
  """`fn` applied to the per-run (axis 0) parts of `args`; `in_axes` is a
  prefix of each argument, None where the argument is shared."""
  return jax.tree.map(
    lambda axis, arg: arg if axis is None else fn(arg),
    in_axes,
    args,
    is_leaf=lambda x: x is None,
  )


def _placed(args: tuple, in_axes: tuple, mesh) -> tuple:
  """A chunk's arguments on the sweep's devices.

  Per-run parts are split over the devices along the configurations; a
  chunk of one on one device is unstacked (the run's own program).
  """
  if len(args[0].seed) == 1:
    return _first_configuration(args, in_axes)
  split = distributed.split_leading(mesh)
  return _per_run(in_axes, args, lambda x: distributed.put(x, split))


def _first_configuration(args: tuple, in_axes: tuple) -> tuple:
  """The first configuration's arguments: row 0 of every per-run part."""
  return _per_run(in_axes, args, lambda x: jax.tree.map(lambda y: y[0], x))


def _one_per_device(run_one, in_axes):
  """`run_one` for a device's single configuration, unvmapped.

  Unbatched, XLA compiles exactly the program a run alone gets, so each
  configuration's numbers do not depend on the device count.
  """

  def run_first(*args):
    metrics = run_one(*_first_configuration(args, in_axes))
    return jax.tree.map(lambda x: x[None], metrics)

  return run_first


def _compile(run_one, example: tuple, in_axes: tuple, mesh):
  """The structure's program, compiled for `example`'s chunk size.

  `example` holds the arguments of a call (stacked points first), `in_axes`
  which of their parts are per run (0) or shared (None). A stacked example
  gets the vmapped program (split over the devices of `mesh` by
  `jax.shard_map` when there are several), a single point `run_one`
  itself. Returns the compiled callable and the seconds tracing and
  compiling took.
  """
  # Compiled ahead of time: every chunk has the example's shapes (the last
  # one is padded), and a compiled program refuses other shapes rather than
  # silently tracing and compiling again, so a structure compiles once.
  # (`chex.assert_max_traces` keys on the definition site, which every
  # structure's `run_one` shares, so it cannot count per structure here.)
  if np.ndim(example[0].seed) == 0:
    program = jax.jit(run_one)
  else:
    program = jax.vmap(run_one, in_axes=in_axes)
    if mesh.size > 1:
      if len(example[0].seed) == mesh.size:
        program = _one_per_device(run_one, in_axes)
      split, whole = P(distributed.CONFIG_AXIS), P()
      program = jax.shard_map(
        program,
        mesh=mesh,
        in_specs=jax.tree.map(
          lambda axis: whole if axis is None else split,
          in_axes,
          is_leaf=lambda x: x is None,
        ),
        out_specs=split,
        # Every output is split, so there is no replication to check; the
        # check would ask each `lax.cond` inside the layers for casts.
        check_vma=False,
      )
    program = jax.jit(program)
  start = time.perf_counter()
  compiled = program.lower(*example).compile()
  return compiled, time.perf_counter() - start


def _row_metrics(
  metrics: SweepMetrics, i: int, counts, regression: bool = False
) -> dict[str, Any]:
  """Run `i`'s CSV metrics; float64 division, as `summarize_eval`.

  Classification: val_acc, val_loss, test_acc; regression: val_mae,
  val_loss, test_mae.
  """
  if regression:
    quality = {
      "val_mae": float(metrics.val_error_sum[i]) / counts["val"],
      "val_loss": float(metrics.val_loss_sum[i]) / counts["val"],
      "test_mae": float(metrics.test_error_sum[i]) / counts["test"],
    }
  else:
    quality = {
      "val_acc": int(metrics.val_correct[i]) / counts["val"],
      "val_loss": float(metrics.val_loss_sum[i]) / counts["val"],
      "test_acc": int(metrics.test_correct[i]) / counts["test"],
    }
  return {
    "best_epoch": int(metrics.best_epoch[i]),
    **quality,
    "train_loss": float(metrics.train_loss[i]),
    "diverged_epoch": int(metrics.diverged_epoch[i]),
  }


def _prepare(workdir, config) -> pathlib.Path | None:
  if workdir is None:
    return None
  workdir = pathlib.Path(workdir).absolute()
  if not distributed.is_writer():
    return workdir
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  except OSError as error:
    raise ValueError(f"workdir {workdir} is not writable: {error}") from error
  return workdir


def _order_key(row_index: int, score: float, val_loss: float):
  # Higher score first, then lower loss, then grid order.
  return (-score, val_loss, row_index)


def select_best(
  rows: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The best row, and the best hyper-parameters averaged over seeds (and
  folds, where rows have a "fold").

  Both rank by validation accuracy (regression rows: lowest validation
  MAE), then lower validation loss, then grid order (a NaN loss or MAE
  ranks last).

  Returns:
    `(best_row, best_mean)`; best_mean holds the axes except the seed, the
    runs' seeds (and folds), and the mean and sample std (ddof=1) of the
    rows' metrics (val_acc, val_loss, test_acc; or val_mae, val_loss,
    test_mae).
  """
  regression = "val_mae" in rows[0]
  metrics = (
    ("val_mae", "val_loss", "test_mae")
    if regression
    else ("val_acc", "val_loss", "test_acc")
  )

  def finite(value):
    return math.inf if math.isnan(value) else value

  def score(value):
    return -finite(value) if regression else value

  best_index = min(
    range(len(rows)),
    key=lambda i: _order_key(
      i, score(rows[i][metrics[0]]), finite(rows[i]["val_loss"])
    ),
  )
  groups: dict[tuple, list[int]] = {}
  for i, row in enumerate(rows):
    key = tuple(row[name] for name in AXES if name != "seed")
    groups.setdefault(key, []).append(i)

  def summary(indices):
    stats = {}
    for metric in metrics:
      mean, std = train_lib.mean_and_std([rows[i][metric] for i in indices])
      stats[f"{metric}_mean"], stats[f"{metric}_std"] = mean, std
    return stats

  summaries = {key: summary(indices) for key, indices in groups.items()}
  best_key = min(
    summaries,
    key=lambda key: _order_key(
      groups[key][0],
      score(summaries[key][f"{metrics[0]}_mean"]),
      finite(summaries[key]["val_loss_mean"]),
    ),
  )
  best_mean = {
    name: rows[groups[best_key][0]][name] for name in AXES if name != "seed"
  }
  best_mean["seeds"] = [rows[i]["seed"] for i in groups[best_key]]
  if "fold" in rows[0]:  # Graph datasets: the runs are seeds x folds.
    best_mean["folds"] = [rows[i]["fold"] for i in groups[best_key]]
  best_mean.update(summaries[best_key])
  return dict(rows[best_index]), best_mean


def write_results(result: SweepResult, workdir: str | os.PathLike) -> None:
  """Writes `sweep.csv` (one row per configuration) and `best.json`."""
  workdir = pathlib.Path(workdir)
  with open(workdir / CSV_NAME, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(result.rows[0]))
    writer.writeheader()
    writer.writerows(result.rows)
  best = {
    "best": result.best,
    "best_mean_over_seeds": result.best_mean,
    "num_configurations": len(result.rows),
    "selection": (
      "best: the run (seed and fold included) of highest validation "
      "accuracy (regression: lowest validation MAE), ties broken by lower "
      "validation loss, then grid order; "
      "best_mean_over_seeds: the same ranking of the metrics averaged over "
      "seeds (and folds, for graph datasets); each run's metrics are at its "
      "epoch selected by train.selection"
    ),
    "compile_seconds": result.compile_seconds,
    "run_seconds": result.run_seconds,
  }
  (workdir / BEST_NAME).write_text(json.dumps(best, indent=2) + "\n")
