"""Synthetic contextual stochastic block models (CSBM), any size.

A CSBM (Deshpande et al., 2018) is a graph whose communities are the
classes: every node belongs to one of ``C`` communities, its features are
its community's mean plus Gaussian noise, and edges join nodes of the same
community more (or less) often than nodes of different ones. It is the
standard synthetic node-classification benchmark whose difficulty is set by
two numbers: the feature signal and the edge homophily.

`make_csbm` builds one in vectorised numpy, in memory linear in the edges
(int32 ids, float32 features): two million nodes of average degree 10 take
a few seconds and about 1 GB.

Edges. ``m = n * average_degree / 2`` undirected edges are drawn: a
fraction ``homophily`` of them join a uniform node to a uniform node of its
own community, the rest to a uniform node of a uniformly chosen other
community. With balanced communities of size ``n / C`` that is the SBM whose
intra- and inter-community edge probabilities are

    p_in  = homophily * average_degree * C / n
    p_out = (1 - homophily) * average_degree * C / (n * (C - 1)),

drawn edge by edge rather than pair by pair (the n^2 pairs are never
visited). Self-loops and repeated pairs, rare when ``average_degree << n /
C``, are dropped, and both directions of every edge are kept
(`validation.canonical_edges`), as every loader returns them.
"""

import numpy as np

from lorap_jax._src.data.containers import NodeDataset
from lorap_jax._src.data.datasets import _single_graph
from lorap_jax._src.data.validation import (
  canonical_edges,
  validate_node_dataset,
)

CSBM_NAME = "csbm"


def _check_arguments(
  num_nodes,
  num_classes,
  num_features,
  average_degree,
  homophily,
  signal,
  fractions,
) -> None:
  """Raises ValueError naming the first bad argument of `make_csbm`."""
  for name, value, least in (
    ("num_classes", num_classes, 2),
    ("num_features", num_features, 1),
    ("num_nodes", num_nodes, 1),
  ):
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
      raise ValueError(f"{name}={value!r} must be an integer")
    if value < least:
      raise ValueError(f"{name}={value} must be at least {least}")
  if num_nodes < num_classes:
    raise ValueError(
      f"num_nodes={num_nodes} must be at least num_classes={num_classes} "
      "(every community needs a node)"
    )
  if num_nodes > np.iinfo(np.int32).max:
    raise ValueError(f"num_nodes={num_nodes} does not fit int32 node ids")
  if not 0.0 <= average_degree < num_nodes - 1:
    raise ValueError(
      f"average_degree={average_degree} must be in [0, num_nodes - 1)"
    )
  if not 0.0 <= homophily <= 1.0:
    raise ValueError(f"homophily={homophily} must be in [0, 1]")
  if not signal >= 0.0:
    raise ValueError(f"signal={signal} must be >= 0")
  for name, value in fractions.items():
    if not 0.0 < value < 1.0:
      raise ValueError(f"{name}={value} must be in (0, 1)")
  if sum(fractions.values()) > 1.0 + 1e-9:
    raise ValueError(
      f"train, val and test fractions {tuple(fractions.values())} sum to "
      f"{sum(fractions.values()):.3f}, more than 1"
    )
  for name, value in fractions.items():
    if int(value * num_nodes) < 1:
      raise ValueError(
        f"{name}={value} of num_nodes={num_nodes} selects no node"
      )


def _draw_edges(
  rng: np.random.Generator,
  labels: np.ndarray,
  num_classes: int,
  num_edges: int,
  homophily: float,
) -> tuple[np.ndarray, np.ndarray]:
  """`num_edges` (u, v) pairs, a fraction `homophily` within a community."""
  num_nodes = len(labels)
  # The nodes of each community side by side: node members[start[c] + i]
  # is community c's i-th node, so a uniform member is one random index.
  members = np.argsort(labels, kind="stable").astype(np.int32)
  sizes = np.bincount(labels, minlength=num_classes)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  first = rng.integers(0, num_nodes, num_edges, dtype=np.int32)
  own = labels[first]
  intra = rng.random(num_edges) < homophily
  # Another community, uniform among the C - 1 others.
  shift = rng.integers(1, num_classes, num_edges, dtype=np.int32)
  community = np.where(intra, own, (own + shift) % num_classes)
  offset = (rng.random(num_edges) * sizes[community]).astype(np.int64)
  second = members[starts[community] + offset]
  return first, second


def make_csbm(
  num_nodes: int = 10_000,
  *,
  num_classes: int = 4,
  num_features: int = 32,
  average_degree: float = 10.0,
  homophily: float = 0.8,
  signal: float = 1.0,
  train_fraction: float = 0.1,
  val_fraction: float = 0.1,
  test_fraction: float = 0.8,
  seed: int = 0,
) -> NodeDataset:
  """A contextual stochastic block model: communities are classes.

  Labels are balanced (``num_nodes / num_classes`` per class, up to one).
  Features are ``signal * mu_c + N(0, I)``, with ``mu_c`` random unit
  directions (one per class), so ``signal`` is the distance of a class mean
  from the origin in noise standard deviations. Edges: see the module
  docstring. The split is one random partition of the nodes in the given
  fractions (nodes left over belong to no split), the same for every run.

  Args:
    num_nodes: Nodes, at least `num_classes`.
    num_classes: Communities (= classes), at least 2.
    num_features: Feature dimension.
    average_degree: Expected neighbours per node (edges per node, both
      directions counted once each), in ``[0, num_nodes - 1)``.
    homophily: Expected fraction of edges inside a community, in [0, 1];
      ``1 / num_classes`` is a graph that ignores the communities.
    signal: Length of every class mean, >= 0 (0: features carry no label
      information).
    train_fraction: Fraction of nodes for training, in (0, 1).
    val_fraction: Fraction for validation, in (0, 1).
    test_fraction: Fraction for testing, in (0, 1); the three sum to <= 1.
    seed: The generator's seed: the same arguments give the same dataset.

  Returns:
    A `NodeDataset` named ``"csbm"``: float32 features, int32 edges in
    both directions, sorted by (receiver, sender), without self-loops.

  Raises:
    ValueError: If an argument is out of range (named in the message).

  Examples:
    >>> data = make_csbm(1000, num_classes=2, average_degree=4, seed=1)
    >>> data.graph.nodes.shape, data.num_classes, int(data.train_mask.sum())
    ((1000, 32), 2, 100)
  """
  fractions = {
    "train_fraction": train_fraction,
    "val_fraction": val_fraction,
    "test_fraction": test_fraction,
  }
  _check_arguments(
    num_nodes,
    num_classes,
    num_features,
    average_degree,
    homophily,
    signal,
    fractions,
  )
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_nodes, dtype=np.int32) % num_classes)

  directions = rng.standard_normal((num_classes, num_features))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  means = (signal * directions).astype(np.float32)
  features = rng.standard_normal((num_nodes, num_features), dtype=np.float32)
  features += means[labels]

  num_edges = round(num_nodes * average_degree / 2)
  first, second = _draw_edges(rng, labels, num_classes, num_edges, homophily)
  senders, receivers = canonical_edges(first, second, num_nodes)
  del first, second

  order = rng.permutation(num_nodes)
  masks = []
  start = 0
  for value in fractions.values():
    count = int(value * num_nodes)
    mask = np.zeros(num_nodes, dtype=bool)
    mask[order[start : start + count]] = True
    masks.append(mask)
    start += count
  dataset = NodeDataset(
    name=CSBM_NAME,
    graph=_single_graph(features, senders, receivers),
    labels=labels,
    train_mask=masks[0],
    val_mask=masks[1],
    test_mask=masks[2],
    num_classes=num_classes,
  )
  return validate_node_dataset(dataset)


def edge_homophily(dataset: NodeDataset) -> float:
  """The fraction of (directed) edges whose ends share a label."""
  graph = dataset.graph
  same = dataset.labels[graph.senders] == dataset.labels[graph.receivers]
  return float(same.mean()) if same.size else 0.0
