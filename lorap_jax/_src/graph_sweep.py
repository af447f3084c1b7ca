"""Sweeps over graph datasets: one program per structure.

A graph run is `train_and_evaluate`'s: on each cross-validation fold, per
epoch a shuffled pass over the fold's training graphs in mini-batches,
then the validation and test graphs, and the test accuracy read at the
epoch selected on validation. Here the whole run is one `lax.scan`: the
host draws each epoch's order of graph ids exactly as `train_and_evaluate`
does (``np.random.default_rng(seed).permutation`` per epoch), and every
step gathers its padded batch from the dataset kept on the device
(`device_batching.gather_batch`). A run is then a pure function of its
numeric hyper-parameters and those ids, which `sweep.run_sweep` vmaps.

All batches of a sweep share one padding budget, the largest batch of any
run it holds, where `train_and_evaluate` pads each batch to the smallest of
a ladder of sizes: the real nodes and edges are the same, only the padding
(which every sum masks out) differs.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax._src import distributed
from lorap_jax._src import sweep as sweep_lib
from lorap_jax._src import train as train_lib
from lorap_jax._src.data import batching
from lorap_jax._src.data import device_batching as device_lib


class GraphRunInputs(NamedTuple):
  """The graph ids a run trains and evaluates on (int32; stacked per run
  in a vmapped call).

  Attributes:
    init_ids: ``[batch_size]``, the first training batch, unshuffled: the
      example the parameters are initialised on.
    schedule: ``[epochs, steps, batch_size]``, each epoch's batches.
    val_ids: ``[val_batches, batch_size]``.
    test_ids: ``[test_batches, batch_size]``.
    target_affine: regression with standardised targets: float32 ``[2]``,
      the fold's training targets' mean and std (`train._target_affine`);
      else None.
  """

  init_ids: np.ndarray
  schedule: np.ndarray
  val_ids: np.ndarray
  test_ids: np.ndarray
  target_affine: np.ndarray | None = None


def epoch_orders(train_ids, epochs: int, seed: int) -> np.ndarray:
  """``[epochs, n]``: each epoch's order of `train_ids`, drawn as
  `train_and_evaluate` draws it for `seed`."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(train_ids) for _ in range(epochs)])


def make_graph_sweep_run(
  config, model, budget: batching.PaddingBudget, loss: str = "cross_entropy"
):
  """`run_one(point, inputs, graphs) -> SweepMetrics` for one structure.

  `run_one` trains one run from scratch on the graph ids of `inputs` (a
  `GraphRunInputs`): initialisation from ``point.seed``, the point's
  hyper-parameters written into the optimizer state, then a scan over the
  epochs, each a scan over its batches (`train.train_step`, dropout keys
  ``fold_in(dropout_key, epoch * 100_003 + step)`` as `train_and_evaluate`
  draws them) and the evaluation of the validation and test batches. Pure
  and traceable: jit it, or vmap it with ``in_axes=(0, 0, None)``.

  Args:
    config: the structure's config.
    model: the graph-level model `train.create_model` built for it.
    budget: the padded sizes of every batch (room for the largest one).
    loss: the training loss (`train.task_loss`); a regression loss reads
      ``inputs.target_affine``.
  """
  criterion = config.train.selection
  # The sums `train.eval_step` returns for this loss, before any batch.
  zero = {"loss_sum": jnp.zeros(()), "count": jnp.zeros((), jnp.int32)}
  if loss == "cross_entropy":
    zero["correct"] = jnp.zeros((), jnp.int32)
  else:
    zero["abs_error"] = jnp.zeros(())

  def run_one(point, inputs: GraphRunInputs, graphs) -> sweep_lib.SweepMetrics:
    def gather(ids):
      return device_lib.gather_batch(graphs, ids, budget)

    def evaluate(state, id_rows):
      def add(totals, ids):
        batch = gather(ids)
        masks = {"split": batch.graph_mask}
        sums = train_lib.eval_step(
          state, train_lib.EvalBatch(batch.graph, batch.labels, masks)
        )
        return jax.tree.map(jnp.add, totals, sums["split"]), None

      return jax.lax.scan(add, zero, id_rows)[0]

    epochs, steps = inputs.schedule.shape[:2]
    init_key, dropout_key = jax.random.split(jax.random.key(point.seed))
    state = train_lib.initial_train_state(
      config,
      model,
      gather(inputs.init_ids).graph,
      init_key,
      steps_per_epoch=steps,
      bits=point.bits,
      loss=loss,
      target_affine=inputs.target_affine,
      update_statistics=config.train.update_statistics,
    )
    state = state.replace(
      opt_state=train_lib.with_hyperparameters(
        state.opt_state, sweep_lib._point_hyperparameters(point)
      )
    )

    def epoch_fn(carry, xs):
      state, selection = carry
      epoch, batches = xs

      def step_fn(state, step_xs):
        step, ids = step_xs
        batch = gather(ids)
        rng = jax.random.fold_in(dropout_key, epoch * 100_003 + step)
        state, metrics = train_lib.train_step(
          state, train_lib.Batch(*batch), rng
        )
        return state, metrics["loss"]

      state, losses = jax.lax.scan(
        step_fn, state, (jnp.arange(steps, dtype=jnp.int32), batches)
      )
      loss = jnp.mean(losses)
      selection = sweep_lib.update_selection(
        selection,
        epoch,
        loss,
        evaluate(state, inputs.val_ids),
        evaluate(state, inputs.test_ids),
        criterion=criterion,
      )
      return (state, selection), loss

    (_, selection), losses = jax.lax.scan(
      epoch_fn,
      (state, sweep_lib.initial_selection()),
      (jnp.arange(epochs, dtype=jnp.int32), inputs.schedule),
    )
    return sweep_lib.selection_metrics(selection, losses[-1])

  return run_one


class GraphTask:
  """What a graph dataset's sweep feeds its program (`sweep.run_sweep`).

  Every numeric point runs on each of the config's folds (a row per fold).
  The dataset sits on the devices once; each run gets the graph ids of its
  fold and seed (`GraphRunInputs`), and all runs one padding budget.
  """

  kind = "graph"
  in_axes = (0, 0, None)

  def __init__(self, config, dataset, mesh, values):
    self.regression = dataset.task == "regression"
    # Refuses a selection that does not fit the task (val_acc in regression).
    self.loss = train_lib.task_loss(config, dataset.task)
    self.config = config
    self.dataset = dataset
    self.epochs = config.train.epochs
    self.batch_size = config.train.batch_size
    self.folds = dict(train_lib._selected_folds(config, dataset))
    self.graphs = distributed.put_replicated(
      device_lib.device_graphs(dataset), mesh
    )
    rows = {
      split: max(
        -(-len(getattr(fold, split)) // self.batch_size)
        for fold in self.folds.values()
      )
      for split in ("val", "test")
    }
    self._eval_ids = {
      index: {
        split: device_lib.id_rows(getattr(fold, split), self.batch_size, n)
        for split, n in rows.items()
      }
      for index, fold in self.folds.items()
    }
    self.budget = self._budget(values["seed"])

  def _budget(self, seeds) -> batching.PaddingBudget:
    """One budget with room for every batch of every run of the sweep."""
    nodes, edges = 0, 0
    for fold in self.folds:
      for seed in seeds:
        run = self.inputs(seed, fold)
        for ids in (run.init_ids, run.schedule, run.val_ids, run.test_ids):
          most_nodes, most_edges = device_lib.batch_sizes(self.dataset, ids)
          nodes, edges = max(nodes, most_nodes), max(edges, most_edges)
    # One padding node and graph beyond the batch, as the host budgets.
    return batching.PaddingBudget(
      n_node=batching._round_up(nodes + 1),
      n_edge=batching._round_up(edges),
      n_graph=self.batch_size + 1,
    )

  def inputs(self, seed: int, fold: int) -> GraphRunInputs:
    """The graph ids of the run of `seed` on fold `fold`.

    Drawn again at each call rather than kept: a schedule is epochs x
    steps x batch ids (2.7 MB for 200 epochs of NCI1), cheap to draw and
    large to hold for every run of a big sweep.
    """
    train = self.folds[fold].train
    schedule = np.stack(
      [
        device_lib.id_rows(order, self.batch_size)
        for order in epoch_orders(train, self.epochs, seed)
      ]
    )
    first = device_lib.id_rows(train[: self.batch_size], self.batch_size)
    return GraphRunInputs(
      init_ids=first[0],
      schedule=schedule,
      val_ids=self._eval_ids[fold]["val"],
      test_ids=self._eval_ids[fold]["test"],
      target_affine=train_lib._target_affine(
        self.config, self.dataset, self.folds[fold]
      ),
    )

  def steps(self, fold: int) -> int:
    return -(-len(self.folds[fold].train) // self.batch_size)

  def points(self, values, numeric) -> list[dict[str, Any]]:
    """Every numeric point on every fold, the folds outermost."""
    return [
      {**point, "fold": fold}
      for fold in self.folds
      for point in sweep_lib._points(values, numeric)
    ]

  def groups(self, points):
    """Points by training steps per epoch, which fix the optimizer's
    schedule and so compile apart (folds of unequal size can differ)."""
    by_steps: dict[int, list] = {}
    for point in points:
      by_steps.setdefault(self.steps(point["fold"]), []).append(point)
    return list(by_steps.values())

  def make_run(self, config, model):
    return make_graph_sweep_run(config, model, self.budget, self.loss)

  def counts(self, point) -> dict[str, int]:
    fold = self.folds[point["fold"]]
    return {"val": max(len(fold.val), 1), "test": max(len(fold.test), 1)}

  def row_fields(self, point) -> dict[str, Any]:
    return {"fold": point["fold"]}

  def args(self, chunk, size: int) -> tuple:
    """(points, graph ids, dataset) of a chunk, stacked to `size`."""
    padded = sweep_lib._padded(chunk, size)
    inputs = [self.inputs(p["seed"], p["fold"]) for p in padded]
    stacked = jax.tree.map(lambda *rows: np.stack(rows), *inputs)
    return (sweep_lib._stack(chunk, size), stacked, self.graphs)
