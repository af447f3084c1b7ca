"""GraphSAGE-style neighbour sampling for node tasks on large graphs.

Full-batch training keeps every node's activations (and every edge's
messages) alive at once; past a few million edges that no longer fits. A
neighbour-sampled mini-batch takes a batch of seed nodes, up to
``fanouts[0]`` of each seed's in-neighbours, up to ``fanouts[1]`` of each
new node's in-neighbours, and so on for one hop per layer (Hamilton et al.,
2017). The loss is taken on the seeds only.

The subgraph is the union of the sampled edges over all hops, relabelled
so that the seeds come first, then each hop's new nodes; every node is
expanded once, at the first hop that reaches it. It is padded to a fixed
budget computed from the batch size and fanouts (`neighbor_budget`), so
one compiled step serves every batch, following `batching`'s convention:
the real nodes and edges form graph 0 and the padding graph 1, whose
padding edges join its one padding node (`jraph.pad_with_graphs`'s
layout). ``globals`` holds a `SubgraphInfo`: the full graph's in-degrees
(GCN's normalisation and Degree-Quant's CDF need them, `layers`) and the
real-node mask (padding sets no quantizer range).

With fanouts at least every in-degree, a seed's L-hop output is the full
graph's (the L-hop neighbourhood is complete and the degrees are the
graph's); `tests/test_sampling.py` checks that the gradients agree.

Sampling is vectorised numpy over a CSR of in-neighbours built once
(`in_neighbor_csr`); a batch costs O(sampled edges + the degrees of the
expanded nodes), nothing of the size of the graph.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jraph
import numpy as np

from lorap_jax._src.data.batching import PaddingBudget
from lorap_jax._src.data.containers import NodeDataset
from lorap_jax._src.subgraph import SubgraphInfo


class NeighborCSR(NamedTuple):
  """In-neighbour lists of a graph in CSR form.

  Attributes:
    indptr: int64 ``[n_nodes + 1]``: node v's in-neighbours are
      ``indices[indptr[v]:indptr[v + 1]]``.
    indices: int32 ``[n_edges]``, sender ids grouped by receiver.
  """

  indptr: np.ndarray
  indices: np.ndarray

  @property
  def num_nodes(self) -> int:
    return len(self.indptr) - 1

  def in_degree(self, nodes: np.ndarray) -> np.ndarray:
    """int64 in-degrees of `nodes`."""
    return self.indptr[nodes + 1] - self.indptr[nodes]


class NodeBatch(NamedTuple):
  """A padded, sampled subgraph around a batch of seed nodes.

  Attributes:
    graph: numpy `jraph.GraphsTuple`: ``nodes`` float32 ``[n_node_budget,
      features]`` (zero on padding), ``senders`` / ``receivers`` int32
      ``[n_edge_budget]`` local ids, ``n_node`` / ``n_edge`` int32 ``[2]``
      (real, padding), ``globals`` a `SubgraphInfo`.
    labels: int32 ``[n_node_budget]``, 0 on padding.
    seed_mask: bool ``[n_node_budget]``, True on the seeds (the first
      ``len(seeds)`` rows): where the loss is taken.
    node_ids: int32 ``[n_real_nodes]``, the full graph's id of each real row.
  """

  graph: jraph.GraphsTuple
  labels: np.ndarray
  seed_mask: np.ndarray
  node_ids: np.ndarray


def in_neighbor_csr(graph: jraph.GraphsTuple) -> NeighborCSR:
  """The CSR of in-neighbours (senders grouped by receiver) of one graph.

  Args:
    graph: One graph; its edges need not be sorted (a loader's are, by
      receiver, and then no sort is done).

  Returns:
    The `NeighborCSR`.
  """
  num_nodes = int(np.asarray(graph.n_node).sum())
  receivers = np.asarray(graph.receivers)
  senders = np.asarray(graph.senders, dtype=np.int32)
  if np.any(receivers[1:] < receivers[:-1]):
    order = np.argsort(receivers, kind="stable")
    receivers, senders = receivers[order], senders[order]
  counts = np.bincount(receivers, minlength=num_nodes)
  indptr = np.zeros(num_nodes + 1, dtype=np.int64)
  np.cumsum(counts, out=indptr[1:])
  return NeighborCSR(indptr, senders)


def _check_fanouts(fanouts: Sequence[int]) -> tuple[int, ...]:
  fanouts = tuple(fanouts)
  if not fanouts or any(
    not isinstance(f, int | np.integer) or isinstance(f, bool) or f < 1
    for f in fanouts
  ):
    raise ValueError(
      f"fanouts={fanouts!r} must be one or more integers >= 1 (one per layer)"
    )
  return tuple(int(f) for f in fanouts)


def neighbor_budget(
  batch_size: int,
  fanouts: Sequence[int],
  *,
  num_nodes: int,
  num_edges: int,
) -> PaddingBudget:
  """Padded sizes that hold any sampled subgraph of a batch.

  A batch of B seeds reaches at most B * f_1 * ... * f_l new nodes at hop l
  and samples as many edges; both are also capped by the graph's size. One
  padding node more, in a padding graph.

  Args:
    batch_size: Seeds per batch (the largest batch).
    fanouts: In-neighbours sampled per node, one per hop.
    num_nodes: Nodes of the full graph.
    num_edges: (Directed) edges of the full graph.

  Returns:
    The `PaddingBudget` (``n_graph`` 2: the subgraph and the padding).

  Raises:
    ValueError: If `batch_size` < 1 or a fanout is not an integer >= 1.
  """
  fanouts = _check_fanouts(fanouts)
  if not isinstance(batch_size, int | np.integer) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
  reached, nodes, edges = int(batch_size), int(batch_size), 0
  for fanout in fanouts:
    reached *= fanout
    nodes += reached
    edges += reached
  return PaddingBudget(
    n_node=min(nodes, num_nodes) + 1,
    n_edge=max(min(edges, num_edges), 1),
    n_graph=2,
  )


def sample_in_edges(
  csr: NeighborCSR,
  nodes: np.ndarray,
  fanout: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Up to `fanout` in-edges of every node, uniformly without replacement.

  Nodes of in-degree at most `fanout` keep every in-edge.

  Args:
    csr: The graph's in-neighbours.
    nodes: int ``[k]`` node ids.
    fanout: The most in-edges kept per node.
    rng: The generator (advanced).

  Returns:
    ``(senders, receivers)``: int32 full-graph ids of the kept edges,
    grouped by receiver in the order of `nodes`.
  """
  nodes = np.asarray(nodes, dtype=np.int64)
  start = csr.indptr[nodes]
  degree = csr.indptr[nodes + 1] - start
  total = int(degree.sum())
  owner = np.repeat(np.arange(len(nodes), dtype=np.int64), degree)
  first_slot = np.cumsum(degree) - degree
  rank = np.arange(total, dtype=np.int64) - np.repeat(first_slot, degree)
  slots = np.arange(total, dtype=np.int64)
  if np.any(degree > fanout):
    # A random order within each node's run (the owner stays the major
    # key), so the first `fanout` of a run are a uniform sample.
    keys = (owner << 32) | rng.integers(0, 2**32, total, dtype=np.int64)
    slots = np.argsort(keys)
  keep = slots[rank < np.repeat(np.minimum(degree, fanout), degree)]
  edges = np.repeat(start, degree)[keep] + rank[keep]
  senders = csr.indices[edges]
  receivers = nodes[owner[keep]].astype(np.int32)
  return senders, receivers


def sample_neighborhood(
  csr: NeighborCSR,
  seeds: np.ndarray,
  fanouts: Sequence[int],
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The sampled L-hop in-neighbourhood of `seeds`, relabelled.

  Args:
    csr: The graph's in-neighbours.
    seeds: int ``[b]`` distinct node ids.
    fanouts: In-edges sampled per node, one per hop.
    rng: The generator (advanced).

  Returns:
    ``(node_ids, senders, receivers)``: int32 full-graph ids of the
    subgraph's nodes (the seeds first, in order, then each hop's new
    nodes), and int32 local ids of its edges.

  Raises:
    ValueError: If the seeds repeat or a fanout is not an integer >= 1.
  """
  fanouts = _check_fanouts(fanouts)
  seeds = np.asarray(seeds, dtype=np.int64)
  if len(np.unique(seeds)) != len(seeds):
    raise ValueError("seeds must be distinct node ids")
  nodes = [seeds]
  seen = np.sort(seeds)
  frontier = seeds
  all_senders, all_receivers = [], []
  for fanout in fanouts:
    senders, receivers = sample_in_edges(csr, frontier, fanout, rng)
    all_senders.append(senders)
    all_receivers.append(receivers)
    reached = np.unique(senders)
    frontier = reached[~np.isin(reached, seen, assume_unique=True)]
    nodes.append(frontier)
    seen = np.union1d(seen, frontier)
  node_ids = np.concatenate(nodes)
  # Global -> local ids: binary search in the sorted ids.
  order = np.argsort(node_ids, kind="stable")
  sorted_ids = node_ids[order]

  def local(ids):
    return order[np.searchsorted(sorted_ids, ids)].astype(np.int32)

  return (
    node_ids.astype(np.int32),
    local(np.concatenate(all_senders)),
    local(np.concatenate(all_receivers)),
  )


def sample_node_batch(
  dataset: NodeDataset,
  csr: NeighborCSR,
  seeds: np.ndarray,
  fanouts: Sequence[int],
  budget: PaddingBudget,
  rng: np.random.Generator,
) -> NodeBatch:
  """One padded, sampled subgraph around `seeds` (module docstring).

  Args:
    dataset: The node dataset (dense features).
    csr: `in_neighbor_csr(dataset.graph)`.
    seeds: int ``[b]`` distinct node ids, b at most the budget's batch size.
    fanouts: In-edges sampled per node, one per hop.
    budget: From `neighbor_budget` with the same (or larger) batch size
      and fanouts.
    rng: The generator (advanced).

  Returns:
    The `NodeBatch`.

  Raises:
    ValueError: If the subgraph exceeds `budget` (a budget made for other
      fanouts or a smaller batch).
  """
  node_ids, senders, receivers = sample_neighborhood(csr, seeds, fanouts, rng)
  num_real, num_edges = len(node_ids), len(senders)
  if num_real >= budget.n_node or num_edges > budget.n_edge:
    raise ValueError(
      f"a sampled subgraph of {num_real} nodes and {num_edges} edges "
      f"exceeds the budget {budget}; build it with neighbor_budget for "
      "this batch size and these fanouts"
    )
  features = np.asarray(dataset.graph.nodes)
  nodes = np.zeros((budget.n_node, features.shape[1]), features.dtype)
  nodes[:num_real] = features[node_ids]
  # Padding edges join the first padding node to itself.
  pad = np.full(budget.n_edge - num_edges, num_real, dtype=np.int32)
  in_degree = np.zeros(budget.n_node, np.float32)
  in_degree[:num_real] = csr.in_degree(node_ids)
  node_mask = np.zeros(budget.n_node, dtype=bool)
  node_mask[:num_real] = True
  graph = jraph.GraphsTuple(
    nodes=nodes,
    edges=None,
    senders=np.concatenate([senders, pad]),
    receivers=np.concatenate([receivers, pad]),
    n_node=np.array([num_real, budget.n_node - num_real], np.int32),
    n_edge=np.array([num_edges, budget.n_edge - num_edges], np.int32),
    globals=SubgraphInfo(in_degree=in_degree, node_mask=node_mask),
  )
  labels = np.zeros(budget.n_node, np.int32)
  labels[:num_real] = dataset.labels[node_ids]
  seed_mask = np.zeros(budget.n_node, dtype=bool)
  seed_mask[: len(seeds)] = True
  return NodeBatch(graph, labels, seed_mask, node_ids)


def iterate_node_batches(
  dataset: NodeDataset,
  csr: NeighborCSR,
  nodes: np.ndarray,
  batch_size: int,
  fanouts: Sequence[int],
  budget: PaddingBudget,
  *,
  shuffle: bool,
  rng: np.random.Generator,
) -> Iterator[NodeBatch]:
  """Sampled batches whose seeds cover `nodes` once (the last may be short).

  Args:
    dataset: The node dataset.
    csr: `in_neighbor_csr(dataset.graph)`.
    nodes: int node ids (e.g. the training nodes), distinct.
    batch_size: Seeds per batch.
    fanouts: In-edges sampled per node, one per hop.
    budget: `neighbor_budget(batch_size, fanouts, ...)`.
    shuffle: Visit `nodes` in a random order.
    rng: The generator for the order and the sampling (advanced).

  Yields:
    One `NodeBatch` per ``batch_size`` seeds.
  """
  nodes = np.asarray(nodes)
  if shuffle:
    nodes = rng.permutation(nodes)
  for start in range(0, len(nodes), batch_size):
    seeds = nodes[start : start + batch_size]
    yield sample_node_batch(dataset, csr, seeds, fanouts, budget, rng)
