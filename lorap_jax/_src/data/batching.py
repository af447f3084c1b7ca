"""Padded mini-batches of graphs for graph classification.

Every batch is padded with `jraph.pad_with_graphs` to one of a few fixed
sizes (budgets), so that a jitted step compiles once per budget rather than
once per batch shape.
"""

import math
import weakref
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
    labels: ``[n_graph]``, the dataset's label dtype (int32 classes, float32
      regression targets); 0 for padding graphs.
    graph_mask: bool ``[n_graph]``, True for the real graphs.
    node_mask: bool ``[n_node_budget]``, True for the real nodes.
  """

  graph: jraph.GraphsTuple
  labels: np.ndarray
  graph_mask: np.ndarray
  node_mask: np.ndarray


def _round_up(value: float, multiple: int = _SIZE_MULTIPLE) -> int:
  """Rounds up to a positive multiple of `multiple`."""
  return max(1, int(np.ceil(value / multiple))) * multiple


def _geometric_sizes(
  smallest: int, largest: int, count: int, multiple: int
) -> list[int]:
  """Returns `count` sizes spaced geometrically, rounded up, ending exactly.

  Args:
    smallest: The first size before rounding.
    largest: The last size before rounding; at least `smallest`.
    count: The number of sizes.
    multiple: What the sizes are rounded up to a multiple of.

  Returns:
    Non-decreasing multiples of `multiple`.
  """
  ratios = np.linspace(0.0, 1.0, count)
  sizes = [
    _round_up(smallest * (largest / smallest) ** r, multiple) for r in ratios
  ]
  # Floating-point error must not push the largest budget past its bound.
  sizes[-1] = _round_up(largest, multiple)
  return [min(size, sizes[-1]) for size in sizes]


def make_budgets(
  graphs: Sequence[jraph.GraphsTuple],
  batch_size: int,
  num_budgets: int = 3,
  *,
  shards: int = 1,
  growth: float = 0.0,
) -> tuple[PaddingBudget, ...]:
  """Chooses padding budgets that fit every batch of `graphs`.

  The largest budget fits the `batch_size` largest graphs together, so any
  batch fits it. With `growth` 0, there are `num_budgets`: the smallest
  fits the largest of a few random batches, i.e. a typical batch, and the
  ones between are spaced geometrically. With `growth` > 1, a finer ladder
  replaces them: budgets from a quarter of a mean batch, each `growth`
  times the last in both nodes and edges, so a batch pads by less than
  that factor (plus the rounding); only the sizes batches use compile.
  All sizes are multiples of 64, and each budget has room for one padding
  node and one padding graph, as `jraph.pad_with_graphs` needs.

  Args:
    graphs: The graphs batches are drawn from (normally all of a dataset).
    batch_size: The largest number of graphs in a batch.
    num_budgets: How many budgets to make without `growth`; fewer come back
      when sizes coincide after rounding.
    shards: Devices a batch is split over: every size is also a multiple
      of it (the extra graphs are empty padding graphs).
    growth: The ratio between consecutive budgets of the fine ladder, or 0
      for `num_budgets` budgets.

  Returns:
    Budgets in increasing order, each with ``n_graph = batch_size + 1``
    (rounded up to a multiple of `shards`).

  Raises:
    ValueError: If `graphs` is empty, `batch_size`, `num_budgets` or
      `shards` is below 1, or `growth` is neither 0 nor above 1.
  """
  if not graphs:
    raise ValueError("make_budgets needs at least one graph, got none.")
  if batch_size < 1 or num_budgets < 1 or shards < 1:
    raise ValueError(
      "batch_size, num_budgets and shards must be at least 1, got "
      f"{batch_size}, {num_budgets} and {shards}."
    )
  if not (growth == 0.0 or growth > 1.0):
    raise ValueError(
      f"growth must be 0 (a few budgets) or above 1 (a ladder), got {growth}."
    )
  n_node = np.array([int(np.sum(g.n_node)) for g in graphs], dtype=np.int64)
  n_edge = np.array([int(np.sum(g.n_edge)) for g in graphs], dtype=np.int64)
  per_batch = min(batch_size, len(graphs))
  # +1: the padding graph needs at least one node of its own.
  worst_nodes = np.sort(n_node)[-per_batch:].sum() + 1
  worst_edges = np.sort(n_edge)[-per_batch:].sum() + 1
  multiple = math.lcm(_SIZE_MULTIPLE, shards)
  if growth:
    node_sizes, edge_sizes = _ladder(
      per_batch * n_node.mean(),
      per_batch * n_edge.mean(),
      (worst_nodes, worst_edges),
      growth,
      multiple,
    )
  else:
    rng = np.random.default_rng(0)
    samples = [
      rng.choice(len(graphs), size=per_batch, replace=False)
      for _ in range(_NUM_SIMULATED_BATCHES)
    ]
    typical_nodes = max(n_node[s].sum() for s in samples) + 1
    typical_edges = max(n_edge[s].sum() for s in samples) + 1
    node_sizes = _geometric_sizes(
      typical_nodes, worst_nodes, num_budgets, multiple
    )
    edge_sizes = _geometric_sizes(
      typical_edges, worst_edges, num_budgets, multiple
    )
  n_graph = _round_up(batch_size + 1, shards)
  budgets = sorted(
    {
      PaddingBudget(nodes, edges, n_graph)
      for nodes, edges in zip(node_sizes, edge_sizes, strict=True)
    }
  )
  return tuple(budgets)


def _ladder(
  mean_nodes: float,
  mean_edges: float,
  worst: tuple[int, int],
  growth: float,
  multiple: int,
) -> tuple[list[int], list[int]]:
  """Node and edge sizes growing together by `growth`, up to `worst`.

  Step i holds ``growth**i / 4`` of a mean batch in both counts, so a
  batch's nodes and edges fit the same step as closely as their ratio
  allows; the last step is `worst` itself.
  """
  worst_nodes, worst_edges = worst
  top = max(
    count / mean
    for count, mean in ((worst_nodes, mean_nodes), (worst_edges, mean_edges))
    if mean > 0  # Graphs without edges: the nodes set the ladder.
  )
  scales = [0.25]
  while scales[-1] * growth < top:
    scales.append(scales[-1] * growth)
  node_sizes = [_round_up(s * mean_nodes + 1, multiple) for s in scales]
  edge_sizes = [_round_up(s * mean_edges + 1, multiple) for s in scales]
  node_sizes.append(_round_up(worst_nodes, multiple))
  edge_sizes.append(_round_up(worst_edges, multiple))
  return (
    [min(size, node_sizes[-1]) for size in node_sizes],
    [min(size, edge_sizes[-1]) for size in edge_sizes],
  )


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


class _PackedGraphs(NamedTuple):
  """All graphs of a dataset concatenated, so batches are gathered at once.

  Attributes:
    nodes: float32 ``[total_nodes, features]``.
    senders: int64 ``[total_edges]`` node ids local to their graph.
    receivers: int64 ``[total_edges]`` node ids local to their graph.
    n_node: int64 ``[n_graphs]`` nodes per graph.
    n_edge: int64 ``[n_graphs]`` edges per graph.
    node_start: int64 ``[n_graphs]`` first row of each graph in ``nodes``.
    edge_start: int64 ``[n_graphs]`` first entry of each graph's edges.
  """

  nodes: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  n_node: np.ndarray
  n_edge: np.ndarray
  node_start: np.ndarray
  edge_start: np.ndarray


# Packing costs one pass over the graphs; keep it while the dataset lives.
_PACKED: "weakref.WeakKeyDictionary[GraphDataset, _PackedGraphs]" = (
  weakref.WeakKeyDictionary()
)


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _packed(dataset: GraphDataset) -> _PackedGraphs:
  """Returns the concatenated graphs of `dataset`, packing them once."""
  if dataset not in _PACKED:
    graphs = dataset.graphs
    n_node = np.array([int(g.n_node[0]) for g in graphs], dtype=np.int64)
    n_edge = np.array([int(g.n_edge[0]) for g in graphs], dtype=np.int64)
    _PACKED[dataset] = _PackedGraphs(
      nodes=np.concatenate([g.nodes for g in graphs]),
      senders=np.concatenate([g.senders for g in graphs]).astype(np.int64),
      receivers=np.concatenate([g.receivers for g in graphs]).astype(np.int64),
      n_node=n_node,
      n_edge=n_edge,
      node_start=_exclusive_cumsum(n_node),
      edge_start=_exclusive_cumsum(n_edge),
    )
  return _PACKED[dataset]


def _gather_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Concatenates ``arange(start, start + count)`` for every pair."""
  offsets = np.repeat(starts - _exclusive_cumsum(counts), counts)
  return offsets + np.arange(int(counts.sum()), dtype=np.int64)


def _make_batch(
  dataset: GraphDataset,
  graph_ids: np.ndarray,
  budgets: Sequence[PaddingBudget],
) -> GraphBatch:
  """Batches and pads the graphs `graph_ids` of `dataset`.

  The result equals `jraph.batch_np` followed by `jraph.pad_with_graphs`
  (one padding graph holds every padding node and edge, its edges point at
  its first node; the remaining padding graphs are empty), but gathers from
  the packed arrays instead of concatenating graph by graph.
  """
  packed = _packed(dataset)
  n_node = packed.n_node[graph_ids]
  n_edge = packed.n_edge[graph_ids]
  num_nodes, num_edges, num_graphs = (
    int(n_node.sum()),
    int(n_edge.sum()),
    len(graph_ids),
  )
  budget = _smallest_fitting_budget(budgets, num_nodes, num_edges, num_graphs)
  node_rows = _gather_ranges(packed.node_start[graph_ids], n_node)
  edge_rows = _gather_ranges(packed.edge_start[graph_ids], n_edge)
  # Local ids become batch ids by the offset of their graph in the batch.
  edge_offset = np.repeat(_exclusive_cumsum(n_node), n_edge)
  nodes = np.zeros((budget.n_node, packed.nodes.shape[1]), np.float32)
  nodes[:num_nodes] = packed.nodes[node_rows]
  # Padding edges join the first padding node to itself, as in jraph.
  senders = np.full(budget.n_edge, num_nodes, dtype=np.int32)
  receivers = np.full(budget.n_edge, num_nodes, dtype=np.int32)
  senders[:num_edges] = packed.senders[edge_rows] + edge_offset
  receivers[:num_edges] = packed.receivers[edge_rows] + edge_offset
  graph_n_node = np.zeros(budget.n_graph, dtype=np.int32)
  graph_n_node[:num_graphs] = n_node
  graph_n_node[num_graphs] = budget.n_node - num_nodes
  graph_n_edge = np.zeros(budget.n_graph, dtype=np.int32)
  graph_n_edge[:num_graphs] = n_edge
  graph_n_edge[num_graphs] = budget.n_edge - num_edges
  # int32 classes, or float32 regression targets: the dataset's dtype.
  labels = np.zeros(budget.n_graph, dtype=dataset.labels.dtype)
  labels[:num_graphs] = dataset.labels[graph_ids]
  graph = jraph.GraphsTuple(
    nodes=nodes,
    edges=None,
    senders=senders,
    receivers=receivers,
    globals=None,
    n_node=graph_n_node,
    n_edge=graph_n_edge,
  )
  return GraphBatch(
    graph=graph,
    labels=labels,
    graph_mask=np.arange(budget.n_graph) < num_graphs,
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
  joined and padded exactly as `jraph.batch_np` and `jraph.pad_with_graphs`
  would, to the smallest budget that fits it.

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
