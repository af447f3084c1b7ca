"""The dataset containers every loader returns (numpy arrays, frozen)."""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jraph
import numpy as np

# Signature: split_fn(seed) -> (train_mask, val_mask, test_mask), bool
# [n_nodes] each, the same masks for the same seed.
SplitFn = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]

# The values of `GraphDataset.task`.
GRAPH_TASKS = ("classification", "regression")


# eq=False: field-wise == on numpy arrays is ambiguous, so compare by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class NodeDataset:
  """A transductive node-classification dataset: one graph, node splits.

  Most datasets have one fixed split (Planetoid's public split). Datasets
  without a standard split (Amazon Photo / Computers) draw a fresh random
  split per seed: they carry a `split_fn`, their masks hold seed 0's split,
  and `split_for_seed` gives any seed's.

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
    split_fn: None for a fixed split, else the function that draws the
      masks of a seed (``split_fn(seed) -> (train, val, test)``); it must be
      deterministic, and picklable where datasets are pickled.
  """

  name: str
  graph: jraph.GraphsTuple
  labels: np.ndarray
  train_mask: np.ndarray
  val_mask: np.ndarray
  test_mask: np.ndarray
  num_classes: int
  split_fn: SplitFn | None = None

  @property
  def num_features(self) -> int:
    """The node feature dimension."""
    return self.graph.nodes.shape[1]

  @property
  def random_split(self) -> bool:
    """Whether each seed has its own split (`split_fn` is set)."""
    return self.split_fn is not None

  def split_for_seed(self, seed: int) -> "NodeDataset":
    """The dataset with `seed`'s split, checked like any loader's result.

    Args:
      seed: The run's seed.

    Returns:
      The dataset itself for a fixed split, else a copy whose masks are
      ``split_fn(seed)``.

    Raises:
      DatasetError: If the drawn masks are invalid (empty, overlapping, of
        the wrong shape or dtype).
    """
    if self.split_fn is None:
      return self
    # Imported here: validation imports this module.
    from lorap_jax._src.data.validation import validate_node_dataset

    train, val, test = self.split_fn(seed)
    return validate_node_dataset(
      dataclasses.replace(self, train_mask=train, val_mask=val, test_mask=test)
    )


class Fold(NamedTuple):
  """One cross-validation fold: disjoint, sorted int32 graph indices."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class GraphDataset:
  """A graph-level dataset: classification or regression, with its folds.

  Attributes:
    name: The dataset name, e.g. ``"mutag"``.
    graphs: One numpy `jraph.GraphsTuple` per graph: ``nodes`` float32
      ``[n_i, features]``, ``senders`` / ``receivers`` int32 local node ids
      with both directions of every edge; ``globals`` is None. ``edges`` is
      None, or edge features aligned with the senders, ``[n_edges, ...]``
      numbers (MNIST superpixels: float32 kernel weights; AqSol: int32 bond
      types); the models and the batching do not read them.
    labels: Classification: int32 ``[n_graphs]`` classes in
      ``0 .. num_classes - 1``. Regression: float32 ``[n_graphs]`` targets.
    num_classes: The number of classes; 1 (one output) for regression.
    folds: The splits of graph indices: `NUM_FOLDS` cross-validation folds,
      or one fold for sets with a fixed train/val/test split (MNIST, AqSol).
    task: ``"classification"`` or ``"regression"`` (one of `GRAPH_TASKS`).
  """

  name: str
  graphs: tuple[jraph.GraphsTuple, ...]
  labels: np.ndarray
  num_classes: int
  folds: tuple[Fold, ...]
  task: str = "classification"

  @property
  def num_features(self) -> int:
    """The node feature dimension."""
    return self.graphs[0].nodes.shape[1]
