"""Padded graph batches gathered on the device, inside a compiled program.

`iterate_batches` builds each batch on the host. A sweep over graph
datasets instead scans over epochs and steps inside one program, so the
batch of a step is gathered there from the whole dataset kept on the
device, given only the ids of its graphs. The result has the layout of
`jraph.batch_np` followed by `jraph.pad_with_graphs` (the host batches'),
for a budget fixed for the whole program.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from lorap_jax._src.data.batching import PaddingBudget, _packed
from lorap_jax._src.data.datasets import GraphDataset

# A graph id meaning "no graph": it fills the end of a short last batch.
NO_GRAPH = -1


class DeviceGraphs(NamedTuple):
  """A graph dataset's graphs concatenated, as device arrays.

  Attributes:
    nodes: float32 ``[total_nodes, features]``.
    senders: int32 ``[total_edges]``, node ids local to their graph.
    receivers: int32 ``[total_edges]``, node ids local to their graph.
    n_node: int32 ``[n_graphs]``.
    n_edge: int32 ``[n_graphs]``.
    node_start: int32 ``[n_graphs]``, each graph's first row of `nodes`.
    edge_start: int32 ``[n_graphs]``, each graph's first edge.
    labels: ``[n_graphs]``, the dataset's label dtype.
  """

  nodes: jax.Array
  senders: jax.Array
  receivers: jax.Array
  n_node: jax.Array
  n_edge: jax.Array
  node_start: jax.Array
  edge_start: jax.Array
  labels: jax.Array


class DeviceBatch(NamedTuple):
  """A gathered batch: the padded graph, labels and real-graph mask."""

  graph: jraph.GraphsTuple
  labels: jax.Array
  graph_mask: jax.Array


def device_graphs(dataset: GraphDataset) -> DeviceGraphs:
  """All graphs of `dataset` on the default device."""
  packed = _packed(dataset)
  return jax.device_put(
    DeviceGraphs(
      nodes=packed.nodes.astype(np.float32),
      senders=packed.senders.astype(np.int32),
      receivers=packed.receivers.astype(np.int32),
      n_node=packed.n_node.astype(np.int32),
      n_edge=packed.n_edge.astype(np.int32),
      node_start=packed.node_start.astype(np.int32),
      edge_start=packed.edge_start.astype(np.int32),
      labels=np.asarray(dataset.labels),
    )
  )


def batch_count(num_graphs: int, batch_size: int) -> int:
  """How many batches `num_graphs` graphs make (the last may be short)."""
  return -(-num_graphs // batch_size)


def id_rows(order: np.ndarray, batch_size: int, rows: int | None = None):
  """Graph ids in rows of `batch_size`, the end filled with `NO_GRAPH`.

  Row i holds the graphs of batch i of `order` (as `iterate_batches` cuts
  them); `rows` pads with empty rows up to that many.
  """
  order = np.asarray(order, np.int64)
  needed = batch_count(len(order), batch_size)
  rows = needed if rows is None else rows
  if rows < needed:
    raise ValueError(f"{len(order)} graphs need {needed} rows, not {rows}")
  ids = np.full(rows * batch_size, NO_GRAPH, np.int32)
  ids[: len(order)] = order
  return ids.reshape(rows, batch_size)


def batch_sizes(dataset: GraphDataset, ids: np.ndarray) -> tuple[int, int]:
  """The most nodes and edges of any row of graph ids (`id_rows`)."""
  packed = _packed(dataset)
  ids = np.asarray(ids).reshape(-1, np.shape(ids)[-1])
  real = ids != NO_GRAPH
  safe = np.where(real, ids, 0)
  nodes = np.where(real, packed.n_node[safe], 0).sum(-1)
  edges = np.where(real, packed.n_edge[safe], 0).sum(-1)
  return int(nodes.max(initial=0)), int(edges.max(initial=0))


def _owners(ends: jax.Array, size: int):
  """For slots 0..size-1 of concatenated ranges ending at `ends`: the range
  each falls in (clipped to the last) and its offset inside it."""
  slots = jnp.arange(size, dtype=jnp.int32)
  owner = jnp.searchsorted(ends, slots, side="right", method="compare_all")
  owner = jnp.minimum(owner, ends.shape[0] - 1)
  starts = ends - jnp.diff(ends, prepend=0)
  return owner, slots - starts[owner], slots < ends[-1]


def gather_batch(
  graphs: DeviceGraphs, graph_ids: jax.Array, budget: PaddingBudget
) -> DeviceBatch:
  """The padded batch of `graph_ids`, traceable (fixed shapes).

  Args:
    graphs: the dataset on the device (`device_graphs`).
    graph_ids: int32 ``[batch_size]``; `NO_GRAPH` entries only at the end.
    budget: the padded sizes; it must leave room for one padding node and
      graph beyond the batch (`batch_sizes` gives the largest batch).

  Returns:
    A `DeviceBatch` equal to the host's (`iterate_batches`) for the same
    graphs and budget: the real graphs, then one padding graph holding
    every padding node and edge (its edges point at its first node), then
    empty graphs.
  """
  real = graph_ids != NO_GRAPH
  ids = jnp.where(real, graph_ids, 0)
  n_node = jnp.where(real, graphs.n_node[ids], 0)
  n_edge = jnp.where(real, graphs.n_edge[ids], 0)
  node_ends, edge_ends = jnp.cumsum(n_node), jnp.cumsum(n_edge)
  num_nodes, num_edges = node_ends[-1], edge_ends[-1]
  first_nodes = node_ends - n_node

  node_owner, offset, is_node = _owners(node_ends, budget.n_node)
  rows = jnp.where(is_node, graphs.node_start[ids[node_owner]] + offset, 0)
  nodes = jnp.where(is_node[:, None], graphs.nodes[rows], 0.0)

  edge_owner, offset, is_edge = _owners(edge_ends, budget.n_edge)
  edges = jnp.where(is_edge, graphs.edge_start[ids[edge_owner]] + offset, 0)

  def batch_ids(local):
    # Local ids move by their graph's first node; padding edges point at
    # the first padding node, as `jraph.pad_with_graphs` makes them.
    return jnp.where(is_edge, local[edges] + first_nodes[edge_owner], num_nodes)

  num_graphs = jnp.sum(real)
  padding = jnp.zeros(budget.n_graph, jnp.int32)
  size = graph_ids.shape[0]
  graph_n_node = (
    padding.at[:size].set(n_node).at[num_graphs].add(budget.n_node - num_nodes)
  )
  graph_n_edge = (
    padding.at[:size].set(n_edge).at[num_graphs].add(budget.n_edge - num_edges)
  )
  labels = jnp.zeros(budget.n_graph, graphs.labels.dtype)
  labels = labels.at[:size].set(jnp.where(real, graphs.labels[ids], 0))
  graph = jraph.GraphsTuple(
    nodes=nodes,
    edges=None,
    senders=batch_ids(graphs.senders).astype(jnp.int32),
    receivers=batch_ids(graphs.receivers).astype(jnp.int32),
    globals=None,
    n_node=graph_n_node,
    n_edge=graph_n_edge,
  )
  return DeviceBatch(graph, labels, jnp.arange(budget.n_graph) < num_graphs)
