"""Degree-Quant's protective masking (Tailor et al., ICLR 2021).

High in-degree nodes accumulate the largest quantization error, so in
training each forward pass "protects" a random subset of nodes, keeping them
(and the messages they send) in full precision, with a probability that
grows with in-degree: p_v = p_min + (p_max - p_min) * F(d_v), F the empirical
CDF of in-degrees within v's own graph (`frameworks.md`, section 2.1). The
unprotected elements alone set the quantizers' ranges; at inference no node
is protected.

Everything here is jit-friendly: the CDF is computed from a sort, without
ragged shapes, for any number of graphs in a padded batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import jraph

from lorap_jax._src.subgraph import subgraph_info


@dataclasses.dataclass(frozen=True, kw_only=True)
class DegreeProtection:
  """Static description of Degree-Quant's protective masking.

  Attributes:
    p_min: protection probability of the lowest in-degree (``--low``).
    p_max: probability of the highest in-degree (``--low + --change``).
    per_layer: draw a fresh mask for every layer; by default one mask per
      forward pass is shared by all layers, as in the reference GIN script.
  """

  p_min: float = 0.1
  p_max: float = 0.2
  per_layer: bool = False

  def __post_init__(self):
    if not 0.0 <= self.p_min <= self.p_max <= 1.0:
      raise ValueError(
        "protection probabilities must satisfy 0 <= p_min <= p_max <= 1, "
        f"got p_min={self.p_min}, p_max={self.p_max}"
      )


def _num_nodes(graph: jraph.GraphsTuple) -> int:
  return graph.nodes.shape[0]  # Dense arrays and SparseFeatures alike.


def in_degree_cdf(graph: jraph.GraphsTuple) -> jax.Array:
  """F(d_v): the fraction of v's graph whose in-degree is at most d_v.

  A batch of graphs sorts one packed (graph, in-degree) key per node
  (`_packed_key_cdf`), or the pairs themselves where the packed key would
  overflow int32 or the degrees are a sampled subgraph's full-graph ones
  (`_lexsorted_cdf`); a single graph counts a histogram (`_one_graph_cdf`).

  Args:
    graph: a (possibly padded, batched) graph; ``n_node`` gives the graphs.
      A neighbour-sampled subgraph (a `SubgraphInfo` in ``globals``) uses
      its nodes' full-graph degrees, ranked among the subgraph's nodes.

  Returns:
    float32 [n_nodes] in (0, 1].
  """
  n_nodes = _num_nodes(graph)
  info = subgraph_info(graph)
  if info is not None:
    # A sampled subgraph: its nodes' degrees in the full graph.
    degree = info.in_degree.astype(jnp.int32)
  else:
    degree = jax.ops.segment_sum(
      jnp.ones(graph.receivers.shape, jnp.int32),
      graph.receivers,
      num_segments=n_nodes,
    )
  n_graphs = graph.n_node.shape[0]
  if n_graphs == 1 and info is None:
    return _one_graph_cdf(degree, graph)
  graph_id = jnp.repeat(
    jnp.arange(n_graphs, dtype=jnp.int32),
    graph.n_node,
    total_repeat_length=n_nodes,
  )
  if info is None and n_graphs * (graph.receivers.shape[0] + 1) < 2**31:
    return _packed_key_cdf(degree, graph_id, graph)
  return _lexsorted_cdf(degree, graph_id, graph)


def _packed_key_cdf(degree, graph_id, graph) -> jax.Array:
  """F(d_v) from one sorted int32 key per node: graph * (E + 1) + degree.

  An in-degree is at most the edge count E, so every key of an earlier
  graph is below every key of a later one: the keys at most v's count the
  earlier graphs' nodes plus v's graph's nodes of degree at most d_v. A
  one-operand sort and a binary search cost a quarter of the two-key sort
  (`_lexsorted_cdf`) on a batch of 128 REDDIT-BINARY graphs.
  """
  key = graph_id * (graph.receivers.shape[0] + 1) + degree
  at_most = jnp.searchsorted(jnp.sort(key), key, side="right")
  graph_start = jnp.cumsum(graph.n_node) - graph.n_node
  count = at_most.astype(jnp.int32) - graph_start[graph_id]
  size = jnp.maximum(graph.n_node[graph_id], 1)
  return count.astype(jnp.float32) / size.astype(jnp.float32)


def _lexsorted_cdf(degree, graph_id, graph) -> jax.Array:
  """F(d_v) by sorting (graph, degree) pairs: any degrees, any batch."""
  n_nodes = degree.shape[0]
  position = jnp.arange(n_nodes, dtype=jnp.int32)
  sorted_graph, sorted_degree, order = jax.lax.sort(
    (graph_id, degree, position), num_keys=2
  )
  # The last position of each run of equal (graph, degree), seen from every
  # position of the run: a reversed running minimum over the run ends.
  next_differs = (sorted_graph[1:] != sorted_graph[:-1]) | (
    sorted_degree[1:] != sorted_degree[:-1]
  )
  run_end = jnp.append(next_differs, True)
  last_of_run = jax.lax.cummin(
    jnp.where(run_end, position, n_nodes), reverse=True
  )
  graph_start = jnp.cumsum(graph.n_node) - graph.n_node
  count = last_of_run + 1 - graph_start[sorted_graph]
  size = jnp.maximum(graph.n_node[sorted_graph], 1)
  cdf_sorted = count.astype(jnp.float32) / size.astype(jnp.float32)
  return jnp.zeros(n_nodes, jnp.float32).at[order].set(cdf_sorted)


def _one_graph_cdf(degree: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
  """F(d_v) of a single graph from a histogram of in-degrees (no sort).

  A node task's graph is one graph: counting nodes per degree, then a
  cumulative sum, is linear and cheaper than the sort. An in-degree is at
  most the edge count, which bounds the histogram.
  """
  bins = graph.receivers.shape[0] + 1
  histogram = jnp.zeros(bins, jnp.int32).at[degree].add(1)
  at_most = jnp.cumsum(histogram)[degree]
  size = jnp.maximum(graph.n_node[0], 1)
  return at_most.astype(jnp.float32) / size.astype(jnp.float32)


def protection_probability(
  graph: jraph.GraphsTuple, protection: DegreeProtection
) -> jax.Array:
  """p_v = p_min + (p_max - p_min) * F(d_v), float32 [n_nodes]."""
  spread = protection.p_max - protection.p_min
  return protection.p_min + spread * in_degree_cdf(graph)


def sample_protection(key: jax.Array, probability: jax.Array) -> jax.Array:
  """bool [n_nodes]: True where a node is protected (kept in FP32)."""
  # The barrier materialises the mask once: otherwise XLA fuses the random
  # draw into its consumers and re-runs the hash per gathered element
  # (per message, per non-zero feature, times the width).
  return jax.lax.optimization_barrier(jax.random.bernoulli(key, probability))
