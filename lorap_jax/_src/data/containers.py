"""The dataset containers every loader returns (numpy arrays, frozen)."""

import dataclasses
from typing import NamedTuple

import jraph
import numpy as np


# eq=False: field-wise == on numpy arrays is ambiguous, so compare by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class NodeDataset:
  """A transductive node-classification dataset: one graph, node splits.

  Attributes:
    name: The dataset name, e.g. ``"cora"``.
    graph: The graph, numpy arrays: ``nodes`` float32 ``[n_nodes, features]``,
      ``senders`` / ``receivers`` int32 ``[n_edges]`` with both directions of
      every edge, sorted by (receiver, sender); ``n_node`` ``[1]``,
      ``n_edge`` ``[1]`` int32; ``edges`` and ``globals`` are None.
    labels: int32 ``[n_nodes]`` classes in ``0 .. num_classes - 1``.
    train_mask: bool ``[n_nodes]``, the training nodes.
    val_mask: bool ``[n_nodes]``, the validation nodes.
    test_mask: bool ``[n_nodes]``, the test nodes.
    num_classes: The number of classes.
  """

  name: str
  graph: jraph.GraphsTuple
  labels: np.ndarray
  train_mask: np.ndarray
  val_mask: np.ndarray
  test_mask: np.ndarray
  num_classes: int

  @property
  def num_features(self) -> int:
    """The node feature dimension."""
    return self.graph.nodes.shape[1]


class Fold(NamedTuple):
  """One cross-validation fold: disjoint, sorted int32 graph indices."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class GraphDataset:
  """A graph-classification dataset with its 10 cross-validation folds.

  Attributes:
    name: The dataset name, e.g. ``"mutag"``.
    graphs: One numpy `jraph.GraphsTuple` per graph: ``nodes`` float32
      ``[n_i, features]``, ``senders`` / ``receivers`` int32 local node ids
      with both directions of every edge; ``edges`` and ``globals`` are None.
    labels: int32 ``[n_graphs]`` classes in ``0 .. num_classes - 1``.
    num_classes: The number of classes.
    folds: `NUM_FOLDS` folds of graph indices.
  """

  name: str
  graphs: tuple[jraph.GraphsTuple, ...]
  labels: np.ndarray
  num_classes: int
  folds: tuple[Fold, ...]

  @property
  def num_features(self) -> int:
    """The node feature dimension."""
    return self.graphs[0].nodes.shape[1]
