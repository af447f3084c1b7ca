"""Node-classification graphs stored as ``.npz`` (Amazon Photo / Computers).

Two key layouts are read, so that any graph saved in either one loads:

* GraphGallery (the files under ``npz/`` of the data directory): keys
  ``adj_matrix`` and ``node_attr``, each a 0-d object array holding a pickled
  `scipy.sparse.csr_matrix`, ``node_label`` int ``[n]`` and an optional
  ``metadata`` dict (``{"class_names": ...}``).
* gnn-benchmark (Shchur et al.'s ``amazon_electronics_*.npz``): the CSR
  components ``adj_data`` / ``adj_indices`` / ``adj_indptr`` / ``adj_shape``,
  the same with ``attr_`` for the features, and ``labels``.

The pickled matrices are read without `numpy.load`'s ``allow_pickle``: the
object arrays are unpickled by an unpickler that accepts only the globals a
pickled numpy array or scipy CSR/CSC matrix needs, so a crafted file cannot
run code.

The graph follows PyG's ``Amazon`` (``read_npz``): every node is kept, the
stored (directed) adjacency is symmetrised and self-loops are dropped;
``largest_component=True`` keeps only the largest connected component
instead, as gnn-benchmark's ``standardize_graph`` does. None of these files
stores a split: each seed draws Shchur et al.'s (2018) random split, 20
training and 30 validation nodes per class and every other node for testing
(`random_per_class_split`).
"""

import functools
import io
import os
import pathlib
import pickle
import zipfile
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from lorap_jax._src.data.containers import NodeDataset
from lorap_jax._src.data.datasets import (
  _is_npz_file_name,
  _row_normalize,
  _single_graph,
)
from lorap_jax._src.data.files import (
  DataFileError,
  DatasetError,
  require_file,
  resolve_data_dir,
)
from lorap_jax._src.data.validation import (
  canonical_edges,
  validate_node_dataset,
)

# load_dataset name -> file under the data directory.
AMAZON_FILES = {
  "amazon-photo": "npz/amazon_photo.npz",
  "amazon-computers": "npz/amazon_cs.npz",
}
# Shchur et al. 2018 (gnn-benchmark's train.conf.yaml defaults).
TRAIN_PER_CLASS = 20
VAL_PER_CLASS = 30

# The globals a pickled numpy array or scipy CSR/CSC matrix names; anything
# else is refused, which keeps unpickling from running arbitrary code.
_SPARSE_CLASSES = {
  "csr_matrix": scipy.sparse.csr_matrix,
  "csc_matrix": scipy.sparse.csc_matrix,
}
_SPARSE_MODULES = (
  "scipy.sparse.csr",  # the name the files use; deprecated in SciPy
  "scipy.sparse._csr",
  "scipy.sparse.csc",
  "scipy.sparse._csc",
)
# The numpy objects a pickled array may name (shared with molecules.py).
NUMPY_PICKLE_GLOBALS = frozenset(
  {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
  }
)
_GALLERY_KEYS = ("adj_matrix", "node_attr", "node_label")
_BENCHMARK_KEYS = ("adj_data", "adj_indices", "adj_indptr", "adj_shape")


class _MatrixUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays, scipy CSR/CSC matrices and plain containers."""

  def find_class(self, module: str, name: str) -> Any:
    if module in _SPARSE_MODULES and name in _SPARSE_CLASSES:
      return _SPARSE_CLASSES[name]
    if (module, name) not in NUMPY_PICKLE_GLOBALS:
      raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: an .npz graph file may only "
        "hold numpy arrays and scipy sparse matrices"
      )
    return super().find_class(module, name)


def _read_member(archive: zipfile.ZipFile, key: str, path: pathlib.Path):
  """Reads one array of an ``.npz``; object arrays through `_MatrixUnpickler`.

  Returns:
    The array; a 0-d object array comes back as the object it holds.

  Raises:
    DataFileError: If the member is not a readable ``.npy`` array.
  """
  try:
    with archive.open(f"{key}.npy") as member:
      stream = io.BytesIO(member.read())
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
      shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if not dtype.hasobject:
      stream.seek(0)
      return np.lib.format.read_array(stream, allow_pickle=False)
    # What np.save writes after the header of an object array: a pickle.
    value = _MatrixUnpickler(stream).load()
  except (
    pickle.UnpicklingError,
    ValueError,
    EOFError,
    KeyError,
    zipfile.BadZipFile,
    OSError,
  ) as error:
    raise DataFileError(
      f"Cannot read array {key!r} of {path}: {error!r}."
    ) from error
  if isinstance(value, np.ndarray) and value.shape == () and shape == ():
    return value.item()
  return value


def _as_sparse(value: Any, key: str, path: pathlib.Path):
  """Returns `value` as a CSR matrix, or raises DataFileError."""
  if scipy.sparse.issparse(value):
    return scipy.sparse.csr_matrix(value)
  if isinstance(value, np.ndarray) and value.ndim == 2:
    return scipy.sparse.csr_matrix(value)
  raise DataFileError(
    f"{path}: {key!r} should hold a sparse or dense 2-D matrix, found "
    f"{type(value).__name__}."
  )


def _csr_from_parts(
  archive: zipfile.ZipFile, prefix: str, path: pathlib.Path
) -> scipy.sparse.csr_matrix:
  """Builds a CSR matrix from gnn-benchmark's ``<prefix>_*`` arrays."""
  parts = {
    part: _read_member(archive, f"{prefix}_{part}", path)
    for part in ("data", "indices", "indptr", "shape")
  }
  try:
    return scipy.sparse.csr_matrix(
      (parts["data"], parts["indices"], parts["indptr"]),
      shape=tuple(int(n) for n in parts["shape"]),
    )
  except ValueError as error:
    raise DataFileError(
      f"{path}: the {prefix}_* arrays are not a valid CSR matrix: {error}."
    ) from error


def read_npz_graph(
  path: str | os.PathLike,
) -> tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix, np.ndarray]:
  """Reads the adjacency, features and labels of an ``.npz`` graph file.

  Args:
    path: A file in the GraphGallery or gnn-benchmark layout (module
      docstring).

  Returns:
    ``(adjacency, features, labels)``: the stored ``[n, n]`` adjacency and
    ``[n, d]`` features as CSR matrices, and int64 ``[n]`` labels.

  Raises:
    FileNotFoundError: If the file does not exist.
    DataFileError: If it is not an ``.npz`` in either layout, or holds
      anything but arrays and sparse matrices.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No .npz graph file at {path.absolute()}.")
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as error:
    raise DataFileError(
      f"{path} is not an .npz (zip) file: {error}."
    ) from error
  with archive:
    keys = {name.removesuffix(".npy") for name in archive.namelist()}
    if set(_GALLERY_KEYS) <= keys:
      adjacency = _as_sparse(
        _read_member(archive, "adj_matrix", path), "adj_matrix", path
      )
      features = _as_sparse(
        _read_member(archive, "node_attr", path), "node_attr", path
      )
      labels = _read_member(archive, "node_label", path)
    elif set(_BENCHMARK_KEYS) <= keys and "labels" in keys:
      adjacency = _csr_from_parts(archive, "adj", path)
      if "attr_data" in keys:
        features = _csr_from_parts(archive, "attr", path)
      elif "attr_matrix" in keys:
        features = _as_sparse(
          _read_member(archive, "attr_matrix", path), "attr_matrix", path
        )
      else:
        raise DataFileError(f"{path} has no node features (attr_*).")
      labels = _read_member(archive, "labels", path)
    else:
      raise DataFileError(
        f"{path} holds the keys {sorted(keys)}, which are neither the "
        f"GraphGallery layout ({', '.join(_GALLERY_KEYS)}) nor the "
        "gnn-benchmark one (adj_data, adj_indices, adj_indptr, adj_shape, "
        "attr_*, labels)."
      )
  labels = np.asarray(labels)
  num_nodes = adjacency.shape[0]
  if adjacency.shape != (num_nodes, num_nodes):
    raise DataFileError(
      f"{path}: the adjacency is {adjacency.shape}, not square."
    )
  if features.shape[0] != num_nodes or labels.shape != (num_nodes,):
    raise DataFileError(
      f"{path}: {num_nodes} nodes in the adjacency, but features of shape "
      f"{features.shape} and labels of shape {labels.shape}."
    )
  if labels.dtype.kind not in "iu":
    raise DataFileError(
      f"{path}: labels must be integers (one class per node), found dtype "
      f"{labels.dtype} (multi-label files are not supported)."
    )
  if labels.size and labels.min() < 0:
    raise DataFileError(
      f"{path}: label {labels.min()} is negative; every node needs a class."
    )
  return adjacency, features, labels.astype(np.int64)


def random_per_class_split(
  labels: np.ndarray,
  seed: int,
  *,
  train_per_class: int = TRAIN_PER_CLASS,
  val_per_class: int = VAL_PER_CLASS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Shchur et al.'s random split: fixed counts per class, the rest tests.

  Draws exactly as gnn-benchmark's ``get_train_val_test_split`` with
  ``np.random.RandomState(seed)``: for each class in order, `train_per_class`
  of its nodes without replacement; then, from the nodes left, `val_per_class`
  per class; every other node is a test node. The same seed and labels give
  the same split as that code on the same node set.

  Args:
    labels: int ``[n_nodes]`` classes ``0 .. C-1``.
    seed: The split's seed.
    train_per_class: Training nodes per class.
    val_per_class: Validation nodes per class.

  Returns:
    ``(train_mask, val_mask, test_mask)``, bool ``[n_nodes]`` each.

  Raises:
    DatasetError: If a class has fewer than ``train_per_class +
      val_per_class + 1`` nodes.

  Examples:
    >>> labels = np.repeat([0, 1], 6)
    >>> train, val, test = random_per_class_split(
    ...   labels, 0, train_per_class=2, val_per_class=1)
    >>> int(train.sum()), int(val.sum()), int(test.sum())
    (4, 2, 6)
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1
  members = [np.flatnonzero(labels == c) for c in range(num_classes)]
  needed = train_per_class + val_per_class + 1
  small = [c for c in range(num_classes) if len(members[c]) < needed]
  if small:
    c = small[0]
    raise DatasetError(
      f"Class {c} has {len(members[c])} node(s), too few for "
      f"{train_per_class} training and {val_per_class} validation nodes per "
      "class with test nodes left over."
    )
  random_state = np.random.RandomState(seed)
  train = np.concatenate(
    [random_state.choice(m, train_per_class, replace=False) for m in members]
  )
  is_train = np.zeros(len(labels), dtype=bool)
  is_train[train] = True
  val = np.concatenate(
    [
      random_state.choice(m[~is_train[m]], val_per_class, replace=False)
      for m in members
    ]
  )
  is_val = np.zeros(len(labels), dtype=bool)
  is_val[val] = True
  return is_train, is_val, ~(is_train | is_val)


def _largest_component(adjacency: scipy.sparse.csr_matrix) -> np.ndarray:
  """int64 ids of the nodes of the largest (weakly) connected component."""
  _, component = scipy.sparse.csgraph.connected_components(
    adjacency, directed=True, connection="weak"
  )
  sizes = np.bincount(component)
  return np.flatnonzero(component == np.argmax(sizes))


def load_npz_graph(
  path: str | os.PathLike,
  *,
  name: str | None = None,
  normalize_features: bool = True,
  largest_component: bool = False,
  train_per_class: int = TRAIN_PER_CLASS,
  val_per_class: int = VAL_PER_CLASS,
) -> NodeDataset:
  """Loads a node-classification graph from an ``.npz`` file.

  Any file in the GraphGallery or gnn-benchmark layout loads (module
  docstring). Features become dense float32 (a bag of words for Amazon;
  the first layer's sparse path is chosen later, by ``config.sparse_input``).
  The split is drawn per seed (`random_per_class_split`): the returned
  dataset holds seed 0's masks, and `NodeDataset.split_for_seed` gives any
  other seed's.

  Args:
    path: The ``.npz`` file.
    name: The dataset name; the file name without ``.npz`` if None.
    normalize_features: Whether to scale each feature row to sum 1.
    largest_component: Keep only the largest connected component (as
      gnn-benchmark) instead of every node (as PyG's ``Amazon``).
    train_per_class: Training nodes per class in each seed's split.
    val_per_class: Validation nodes per class in each seed's split.

  Returns:
    The dataset, with a per-seed ``split_fn``.

  Raises:
    FileNotFoundError: If the file does not exist.
    DataFileError: If the file is malformed, or a class is too small for
      the split.
  """
  path = pathlib.Path(path)
  adjacency, attributes, labels = read_npz_graph(path)
  if largest_component:
    keep = _largest_component(adjacency)
    adjacency = adjacency[keep][:, keep]
    attributes = attributes[keep]
    labels = labels[keep]
  num_nodes = adjacency.shape[0]
  coo = adjacency.tocoo()
  senders, receivers = canonical_edges(coo.row, coo.col, num_nodes)
  features = attributes.toarray().astype(np.float32)
  if normalize_features:
    features = _row_normalize(features)
  labels = labels.astype(np.int32)
  split_fn = functools.partial(
    random_per_class_split,
    labels,
    train_per_class=train_per_class,
    val_per_class=val_per_class,
  )
  try:
    train, val, test = split_fn(0)
  except DatasetError as error:
    raise DataFileError(f"{path}: {error}") from error
  dataset = NodeDataset(
    name=name if name is not None else path.name.removesuffix(".npz"),
    graph=_single_graph(features, senders, receivers),
    labels=labels,
    train_mask=train,
    val_mask=val,
    test_mask=test,
    num_classes=int(labels.max()) + 1,
    split_fn=split_fn,
  )
  return validate_node_dataset(dataset, source=f".npz graph {path}")


def load_amazon(
  name: str, data_dir: str | os.PathLike | None, **options: Any
) -> NodeDataset:
  """Loads Amazon Photo / Computers, or any ``npz/<file>.npz`` by name.

  Args:
    name: ``"amazon-photo"`` (``npz/amazon_photo.npz``),
      ``"amazon-computers"`` (``npz/amazon_cs.npz``), or a path inside the
      data directory such as ``"npz/coauthor_cs.npz"``.
    data_dir: The data directory, or None for ``LORAP_DATA_DIR``.
    **options: Keyword options of `load_npz_graph`.

  Returns:
    The dataset, with a per-seed split (`load_npz_graph`).

  Raises:
    ValueError: If `name` is neither an Amazon name nor ``npz/<file>.npz``.
    FileNotFoundError: If the data directory or the file is missing.
    DataFileError: If the file is corrupt or malformed.
  """
  key = name.lower()
  if key in AMAZON_FILES:
    relative = AMAZON_FILES[key]
  elif _is_npz_file_name(name):
    relative = name
    key = name
  else:
    raise ValueError(
      f"Unknown .npz dataset {name!r}; expected one of "
      f"{', '.join(AMAZON_FILES)} or npz/<file>.npz."
    )
  path = require_file(resolve_data_dir(data_dir), relative)
  return load_npz_graph(path, name=key, **options)
