"""What a neighbour-sampled subgraph carries about the graph it came from.

A sampled subgraph (`data/sampling.py`) holds only some in-edges of some
nodes, so the quantities layers derive from edge counts (GCN's degree
normalisation, Degree-Quant's in-degree CDF) would see the subgraph's
degrees, not the graph's; and its padding rows must not set quantizer
ranges. The sampler puts a `SubgraphInfo` in the subgraph's ``globals``
(unused by node tasks otherwise); layers that find one use it.
"""

from typing import NamedTuple

import jax


class SubgraphInfo(NamedTuple):
  """Per-node facts of a padded, sampled subgraph (``graph.globals``).

  Attributes:
    in_degree: float32 ``[n_nodes]``, each node's in-degree in the full
      graph; 0 on padding nodes.
    node_mask: bool ``[n_nodes]``, True for real (unpadded) nodes.
  """

  in_degree: jax.Array
  node_mask: jax.Array


def subgraph_info(graph) -> SubgraphInfo | None:
  """The graph's `SubgraphInfo`, or None for a whole graph or a batch."""
  info = graph.globals
  return info if isinstance(info, SubgraphInfo) else None
