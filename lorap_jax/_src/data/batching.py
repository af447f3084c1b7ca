"""Padded mini-batches of graphs for graph classification.

Every batch is padded with `jraph.pad_with_graphs` to one of a few fixed
sizes (budgets), so that a jitted step compiles once per budget rather than
once per batch shape.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jraph
import numpy as np

from lorap_jax._src.data.datasets import GraphDataset

# Padded sizes are multiples of this, which keeps shapes accelerator-friendly.
_SIZE_MULTIPLE = 64
# Random batches drawn to estimate the size of a typical batch.
_NUM_SIMULATED_BATCHES = 32


class PaddingBudget(NamedTuple):
  """Padded sizes of one batch shape, as `jraph.pad_with_graphs` takes them.

  Attributes:
    n_node: Total nodes, at least one more than the real nodes.
    n_edge: Total edges.
    n_graph: Total graphs, one more than the largest number of real graphs.
  """

  n_node: int
  n_edge: int
  n_graph: int


class GraphBatch(NamedTuple):
  """A padded batch of graphs with its labels.

  Attributes:
    graph: The padded numpy `jraph.GraphsTuple`: ``nodes`` float32
      ``[n_node_budget, features]``, ``senders`` / ``receivers`` int32
      ``[n_edge_budget]``, ``n_node`` / ``n_edge`` int32 ``[n_graph]``.
    labels: int32 ``[n_graph]``; 0 for padding graphs.
    graph_mask: bool ``[n_graph]``, True for the real graphs.
    node_mask: bool ``[n_node_budget]``, True for the real nodes.
  """

  graph: jraph.GraphsTuple
  labels: np.ndarray
  graph_mask: np.ndarray
  node_mask: np.ndarray


def _round_up(value: float) -> int:
  """Rounds up to a positive multiple of `_SIZE_MULTIPLE`."""
  return max(1, int(np.ceil(value / _SIZE_MULTIPLE))) * _SIZE_MULTIPLE


def _geometric_sizes(smallest: int, largest: int, count: int) -> list[int]:
  """Returns `count` sizes spaced geometrically, rounded up, ending exactly.

  Args:
    smallest: The first size before rounding.
    largest: The last size before rounding; at least `smallest`.
    count: The number of sizes.

  Returns:
    Non-decreasing multiples of `_SIZE_MULTIPLE`.
  """
  ratios = np.linspace(0.0, 1.0, count)
  sizes = [_round_up(smallest * (largest / smallest) ** r) for r in ratios]
  # Floating-point error must not push the largest budget past its bound.
  sizes[-1] = _round_up(largest)
  return [min(size, sizes[-1]) for size in sizes]


def make_budgets(
  graphs: Sequence[jraph.GraphsTuple], batch_size: int, num_budgets: int = 3
) -> tuple[PaddingBudget, ...]:
  """Chooses a few padding budgets that fit every batch of `graphs`.

  The largest budget fits the `batch_size` largest graphs together, so any
  batch fits it. The smallest fits the largest of a few random batches, i.e.
  a typical batch, and the ones between are spaced geometrically. All sizes
  are multiples of 64, and each budget has room for one padding node and
  one padding graph, as `jraph.pad_with_graphs` needs.

  Args:
    graphs: The graphs batches are drawn from (normally all of a dataset).
    batch_size: The largest number of graphs in a batch.
    num_budgets: How many budgets to make; fewer come back when sizes
      coincide after rounding.

  Returns:
    Budgets in increasing order, each with ``n_graph = batch_size + 1``.

  Raises:
    ValueError: If `graphs` is empty or `batch_size` or `num_budgets` is
      below 1.
  """
  if not graphs:
    raise ValueError("make_budgets needs at least one graph, got none.")
  if batch_size < 1 or num_budgets < 1:
    raise ValueError(
      f"batch_size and num_budgets must be at least 1, got {batch_size} and "
      f"{num_budgets}."
    )
  n_node = np.array([int(np.sum(g.n_node)) for g in graphs], dtype=np.int64)
  n_edge = np.array([int(np.sum(g.n_edge)) for g in graphs], dtype=np.int64)
  per_batch = min(batch_size, len(graphs))
  # +1: the padding graph needs at least one node of its own.
  worst_nodes = np.sort(n_node)[-per_batch:].sum() + 1
  worst_edges = np.sort(n_edge)[-per_batch:].sum() + 1
  rng = np.random.default_rng(0)
  samples = [
    rng.choice(len(graphs), size=per_batch, replace=False)
    for _ in range(_NUM_SIMULATED_BATCHES)
  ]
  typical_nodes = max(n_node[s].sum() for s in samples) + 1
  typical_edges = max(n_edge[s].sum() for s in samples) + 1
  node_sizes = _geometric_sizes(typical_nodes, worst_nodes, num_budgets)
  edge_sizes = _geometric_sizes(typical_edges, worst_edges, num_budgets)
  budgets = sorted(
    {
      PaddingBudget(nodes, edges, batch_size + 1)
      for nodes, edges in zip(node_sizes, edge_sizes, strict=True)
    }
  )
  return tuple(budgets)


def _smallest_fitting_budget(
  budgets: Sequence[PaddingBudget],
  num_nodes: int,
  num_edges: int,
  num_graphs: int,
) -> PaddingBudget:
  """Returns the first budget with room for a batch plus its padding graph.

  Raises:
    ValueError: If no budget is large enough.
  """
  for budget in budgets:
    if (
      num_nodes < budget.n_node
      and num_edges <= budget.n_edge
      and num_graphs < budget.n_graph
    ):
      return budget
  raise ValueError(
    f"A batch of {num_graphs} graphs with {num_nodes} nodes and {num_edges} "
    f"edges fits none of the budgets {list(budgets)}; make the budgets with "
    "make_budgets from all graphs and the same batch_size."
  )


def _make_batch(
  dataset: GraphDataset,
  graph_ids: np.ndarray,
  budgets: Sequence[PaddingBudget],
) -> GraphBatch:
  """Batches and pads the graphs `graph_ids` of `dataset`."""
  batched = jraph.batch_np([dataset.graphs[i] for i in graph_ids])
  num_nodes = int(np.sum(batched.n_node))
  budget = _smallest_fitting_budget(
    budgets, num_nodes, int(np.sum(batched.n_edge)), len(graph_ids)
  )
  padded = jraph.pad_with_graphs(batched, *budget)
  # jraph's node offsets are int64 sums, which upcast the edge indices.
  padded = padded._replace(
    senders=padded.senders.astype(np.int32),
    receivers=padded.receivers.astype(np.int32),
  )
  labels = np.zeros(budget.n_graph, dtype=np.int32)
  labels[: len(graph_ids)] = dataset.labels[graph_ids]
  return GraphBatch(
    graph=padded,
    labels=labels,
    graph_mask=np.arange(budget.n_graph) < len(graph_ids),
    node_mask=np.arange(budget.n_node) < num_nodes,
  )


def _batches(
  dataset: GraphDataset,
  order: np.ndarray,
  batch_size: int,
  budgets: Sequence[PaddingBudget],
) -> Iterator[GraphBatch]:
  """Yields the padded batches of consecutive chunks of `order`."""
  for start in range(0, len(order), batch_size):
    yield _make_batch(dataset, order[start : start + batch_size], budgets)


def iterate_batches(
  dataset: GraphDataset,
  indices: Sequence[int] | np.ndarray,
  batch_size: int,
  budgets: Sequence[PaddingBudget],
  *,
  shuffle: bool,
  rng: np.random.Generator | None = None,
) -> Iterator[GraphBatch]:
  """Iterates once over padded batches of the graphs `indices`.

  Each batch of up to `batch_size` graphs (the last may be smaller) is
  joined with `jraph.batch_np` and padded with `jraph.pad_with_graphs` to
  the smallest budget that fits it.

  Args:
    dataset: The dataset.
    indices: int ``[n]`` indices of the graphs to visit, e.g. a fold's
      ``train``.
    batch_size: The number of graphs per batch.
    budgets: Padding budgets in increasing order, from `make_budgets` with
      the same `batch_size`.
    shuffle: Whether to visit the graphs in a random order.
    rng: The random generator to shuffle with; required when `shuffle`.

  Returns:
    An iterator of `GraphBatch`; every graph of `indices` is in exactly one.

  Raises:
    ValueError: If `batch_size` is below 1, `budgets` is empty, `indices` is
      not 1-D, or `shuffle` is set without an `rng`. A batch that fits no
      budget raises ValueError while iterating.
  """
  # Checked here rather than inside a generator, so errors surface at once.
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  if not budgets:
    raise ValueError("iterate_batches needs at least one padding budget.")
  order = np.asarray(indices, dtype=np.int64)
  if order.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {order.shape}.")
  if shuffle:
    if rng is None:
      raise ValueError(
        "shuffle=True needs an rng (a np.random.Generator), so that the "
        "order is reproducible."
      )
    order = rng.permutation(order)
  return _batches(dataset, order, batch_size, budgets)
