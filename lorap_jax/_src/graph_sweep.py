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

The batches of a sweep share three padding budgets (`GraphBudgets`: full
training batches, an epoch's last batch, evaluation batches), each the
largest such batch of any run the sweep holds, where `train_and_evaluate`
pads each batch to the smallest of a ladder of sizes: the real nodes and
edges are the same, only the padding (which every sum masks out) differs.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax._src import distributed
from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import sweep as sweep_lib
from lorap_jax._src import train as train_lib
from lorap_jax._src import train_state as state_lib
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
      the fold's training targets' mean and std (`runs.fold_target_affine`);
      else None.
  """

  init_ids: np.ndarray
  schedule: np.ndarray
  val_ids: np.ndarray
  test_ids: np.ndarray
  target_affine: np.ndarray | None = None


class GraphBudgets(NamedTuple):
  """Padded sizes of a sweep's batches, each with room for its largest.

  Attributes:
    full: the training steps of an epoch but its last (full batches), and
      the initialisation batch when there are several steps.
    last: an epoch's last step (the remainder of the fold's graphs).
    eval: the validation and test batches.
  """

  full: batching.PaddingBudget
  last: batching.PaddingBudget
  eval: batching.PaddingBudget


def epoch_orders(train_ids, epochs: int, seed: int) -> np.ndarray:
  """``[epochs, n]``: each epoch's order of `train_ids`, drawn as
  `train_and_evaluate` draws it for `seed`."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(train_ids) for _ in range(epochs)])


def make_graph_sweep_run(
  config, model, budgets: GraphBudgets, loss: str = "cross_entropy"
):
  """`run_one(point, inputs, graphs) -> SweepMetrics` for one structure.

  `run_one` trains one run from scratch on the graph ids of `inputs` (a
  `GraphRunInputs`): initialisation from ``point.seed``, the point's
  hyper-parameters written into the optimizer state, then a scan over the
  epochs, each a scan over its batches (`steps.train_step`, dropout keys
  ``fold_in(dropout_key, epoch * 100_003 + step)`` as `train_and_evaluate`
  draws them) and the evaluation of the validation and test batches. Pure
  and traceable: jit it, or vmap it with ``in_axes=(0, 0, None)``.

  The last step of an epoch and the evaluation batches have budgets of
  their own: a short remainder, or a fold's few validation graphs, padded
  to a full batch's size would cost what a full batch costs.

  Args:
    config: the structure's config.
    model: the graph-level model `train_state.create_model` built for it.
    budgets: the padded sizes of the batches (`GraphBudgets`).
    loss: the training loss (`steps.task_loss`); a regression loss reads
      ``inputs.target_affine``.
  """
  criterion = config.train.selection
  # The sums `steps.eval_step` returns for this loss, before any batch.
  zero = {"loss_sum": jnp.zeros(()), "count": jnp.zeros((), jnp.int32)}
  if loss == "cross_entropy":
    zero["correct"] = jnp.zeros((), jnp.int32)
  else:
    zero["abs_error"] = jnp.zeros(())

  def run_one(point, inputs: GraphRunInputs, graphs) -> sweep_lib.SweepMetrics:
    def gather(ids, budget):
      return device_lib.gather_batch(graphs, ids, budget)

    def evaluate(state, id_rows):
      def add(totals, ids):
        batch = gather(ids, budgets.eval)
        masks = {"split": batch.graph_mask}
        sums = steps_lib.eval_step(
          state, steps_lib.EvalBatch(batch.graph, batch.labels, masks)
        )
        return jax.tree.map(jnp.add, totals, sums["split"]), None

      return jax.lax.scan(add, zero, id_rows)[0]

    epochs, steps = inputs.schedule.shape[:2]
    init_key, dropout_key = jax.random.split(jax.random.key(point.seed))
    # With one step an epoch the first batch is that step's, the last.
    init_budget = budgets.full if steps > 1 else budgets.last
    state = state_lib.initial_train_state(
      config,
      model,
      gather(inputs.init_ids, init_budget).graph,
      init_key,
      steps_per_epoch=steps,
      bits=point.bits,
      loss=loss,
      target_affine=inputs.target_affine,
      update_statistics=config.train.update_statistics,
    )
    state = state.replace(
      opt_state=state_lib.with_hyperparameters(
        state.opt_state, sweep_lib.point_hyperparameters(point)
      )
    )

    def train_on(state, step, ids, epoch, budget):
      batch = gather(ids, budget)
      rng = jax.random.fold_in(dropout_key, epoch * 100_003 + step)
      state, metrics = steps_lib.train_step(state, steps_lib.Batch(*batch), rng)
      return state, metrics["loss"]

    def epoch_fn(carry, xs):
      state, selection = carry
      epoch, batches = xs
      state, losses = jax.lax.scan(
        lambda state, step_xs: train_on(state, *step_xs, epoch, budgets.full),
        state,
        (jnp.arange(steps - 1, dtype=jnp.int32), batches[:-1]),
      )
      state, last_loss = train_on(
        state, steps - 1, batches[-1], epoch, budgets.last
      )
      train_loss = jnp.mean(jnp.append(losses, last_loss))
      selection = sweep_lib.update_selection(
        selection,
        epoch,
        train_loss,
        evaluate(state, inputs.val_ids),
        evaluate(state, inputs.test_ids),
        criterion=criterion,
      )
      return (state, selection), train_loss

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
  fold and seed (`GraphRunInputs`), and all runs the same budgets.
  """

  kind = "graph"
  in_axes = (0, 0, None)

  def __init__(self, config, dataset, mesh, values):
    self.regression = dataset.task == "regression"
    # Refuses a selection that does not fit the task (val_acc in regression).
    self.loss = steps_lib.task_loss(config, dataset.task)
    self.config = config
    self.dataset = dataset
    self.epochs = config.train.epochs
    self.batch_size = config.train.batch_size
    self.folds = dict(train_lib.selected_folds(config, dataset))
    self.graphs = distributed.put_replicated(
      device_lib.device_graphs(dataset), mesh
    )
    rows = {
      split: max(
        device_lib.batch_count(len(getattr(fold, split)), self.batch_size)
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
    self.budgets = self._budgets(values["seed"])

  def _budgets(self, seeds) -> GraphBudgets:
    """Budgets with room for every batch of every run of the sweep."""
    largest = {name: (0, 0) for name in GraphBudgets._fields}

    def fit(name, ids):
      nodes, edges = device_lib.batch_sizes(self.dataset, ids)
      most_nodes, most_edges = largest[name]
      largest[name] = (max(nodes, most_nodes), max(edges, most_edges))

    for fold in self.folds:
      # Evaluation batches are a fold's, whatever the seed.
      fit("eval", self._eval_ids[fold]["val"])
      fit("eval", self._eval_ids[fold]["test"])
      for seed in seeds:
        run = self.inputs(seed, fold)
        several = run.schedule.shape[1] > 1
        fit("full" if several else "last", run.init_ids)
        fit("full", run.schedule[:, :-1])
        fit("last", run.schedule[:, -1])
    # One padding node and graph beyond the batch, as the host budgets.
    return GraphBudgets(
      *(
        batching.PaddingBudget(
          n_node=batching._round_up(nodes + 1),
          n_edge=batching._round_up(edges),
          n_graph=self.batch_size + 1,
        )
        for nodes, edges in largest.values()
      )
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
      target_affine=runs_lib.fold_target_affine(
        self.config, self.dataset, self.folds[fold]
      ),
    )

  def steps(self, fold: int) -> int:
    return device_lib.batch_count(len(self.folds[fold].train), self.batch_size)

  def points(self, values, numeric) -> list[dict[str, Any]]:
    """Every numeric point on every fold, the folds outermost."""
    return [
      {**point, "fold": fold}
      for fold in self.folds
      for point in sweep_lib.grid_points(values, numeric)
    ]

  def groups(self, points):
    """Points by training steps per epoch, which fix the optimizer's
    schedule and so compile apart (folds of unequal size can differ)."""
    by_steps: dict[int, list] = {}
    for point in points:
      by_steps.setdefault(self.steps(point["fold"]), []).append(point)
    return list(by_steps.values())

  def make_run(self, config, model):
    return make_graph_sweep_run(config, model, self.budgets, self.loss)

  def counts(self, point) -> dict[str, int]:
    fold = self.folds[point["fold"]]
    return {"val": max(len(fold.val), 1), "test": max(len(fold.test), 1)}

  def row_fields(self, point) -> dict[str, Any]:
    return {"fold": point["fold"]}

  def args(self, chunk, size: int) -> tuple:
    """(points, graph ids, dataset) of a chunk, stacked to `size`."""
    padded = sweep_lib.padded_chunk(chunk, size)
    inputs = [self.inputs(p["seed"], p["fold"]) for p in padded]
    stacked = jax.tree.map(lambda *rows: np.stack(rows), *inputs)
    return (sweep_lib.stacked_points(chunk, size), stacked, self.graphs)
