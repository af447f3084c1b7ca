"""Loaders for the node- and graph-level benchmarks.

These on-disk formats are read, all from a local data directory (see
`files.resolve_data_dir`):

* Planetoid pickles (Cora, CiteSeer, PubMed) with the standard public split,
  as loaded by Kipf & Welling's GCN code and PyG's ``Planetoid``.
* The DGCNN/GIN single-text-file format with its 10-fold index files.
* TUDataset raw text files, split with a seeded stratified 10-fold split.
* ``.npz`` node-classification graphs (Amazon Photo / Computers, any
  ``npz/<file>.npz``) with a random split per seed: `npz`.
* The raw MNIST images, turned into SLIC superpixel graphs and cached:
  `superpixels`.
* AqSol molecules (graph regression) from SMILES and benchmarking-gnns'
  pickles: `molecules`.

``csbm`` reads no file: it generates a synthetic contextual stochastic block
model of any size (`csbm.make_csbm`).

Every graph comes back as a numpy `jraph.GraphsTuple` whose edges list both
directions of every undirected edge, without self-loops or duplicates, sorted
by (receiver, sender). Every loader checks its result with
`validation.validate_node_dataset` / `validate_graph_dataset` before
returning it.
"""

import itertools
import os
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any, NamedTuple

import jraph
import numpy as np
import scipy.sparse

from lorap_jax._src.data.containers import Fold, GraphDataset, NodeDataset
from lorap_jax._src.data.files import (
  DataFileError,
  require_file,
  resolve_data_dir,
)
from lorap_jax._src.data.validation import (
  canonical_edges,
  validate_graph_dataset,
  validate_node_dataset,
)

NUM_FOLDS = 10
NODE_FEATURE_OPTIONS = ("auto", "tags", "degree")

# Degree-Quant one-hot encodes degrees below this maximum degree and
# standardises them otherwise.
_ONE_HOT_DEGREE_LIMIT = 1000
_PLANETOID_VAL_SIZE = 500

_PLANETOID_NAMES = ("cora", "citeseer", "pubmed")
# The files ``planetoid/<name>/ind.<name>.<suffix>`` of each Planetoid set.
PLANETOID_SUFFIXES = (
  "x",
  "y",
  "tx",
  "ty",
  "allx",
  "ally",
  "graph",
  "test.index",
)
# load_dataset name -> directory under gin/.
_GIN_DIRS = {
  "mutag": "MUTAG",
  "proteins": "PROTEINS",
  "nci1": "NCI1",
  "imdb-binary": "IMDBBINARY",
  "imdb-multi": "IMDBMULTI",
  "ptc": "PTC",
  "reddit-binary": "REDDIT-BINARY",
}
# load_dataset name -> directory under tu/.
_TU_DIRS = {"tu-mutag": "MUTAG", "tu-proteins": "PROTEINS", "tu-nci1": "NCI1"}
# The files ``tu/<NAME>/<NAME>_<part>.txt`` the TU loader reads.
TU_PARTS = ("A", "graph_indicator", "graph_labels", "node_labels")

# Node classification with a random split per seed (npz.AMAZON_FILES).
_NPZ_NAMES = ("amazon-photo", "amazon-computers")
_MNIST_NAME = "mnist-superpixels"
_AQSOL_NAME = "aqsol"
# Generated, not read (csbm.make_csbm); no data directory needed.
_CSBM_NAME = "csbm"

DATASET_NAMES = (
  *_PLANETOID_NAMES,
  *_NPZ_NAMES,
  _CSBM_NAME,
  *_GIN_DIRS,
  *_TU_DIRS,
  _MNIST_NAME,
  _AQSOL_NAME,
)

# Whitespace as `bytes.split` sees it.
_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(b" \t\n\r\x0b\x0c")] = True


# ---------------------------------------------------------------------------
# Shared graph helpers.


def _single_graph(
  nodes: np.ndarray, senders: np.ndarray, receivers: np.ndarray
) -> jraph.GraphsTuple:
  """Wraps one graph's numpy arrays in a `jraph.GraphsTuple`."""
  return jraph.GraphsTuple(
    nodes=nodes,
    edges=None,
    senders=senders,
    receivers=receivers,
    n_node=np.array([nodes.shape[0]], dtype=np.int32),
    n_edge=np.array([senders.shape[0]], dtype=np.int32),
    globals=None,
  )


def _remap_labels(raw_labels: np.ndarray) -> tuple[np.ndarray, int]:
  """Maps arbitrary integer labels to ``0 .. C-1`` in sorted raw order.

  Args:
    raw_labels: int ``[n]`` labels as stored.

  Returns:
    ``(labels, num_classes)`` with labels int32 ``[n]``.
  """
  values, labels = np.unique(raw_labels, return_inverse=True)
  return labels.astype(np.int32), len(values)


def _one_hot(indices: np.ndarray, depth: int) -> np.ndarray:
  """Returns float32 ``[len(indices), depth]`` one-hot rows."""
  encoded = np.zeros((len(indices), depth), dtype=np.float32)
  encoded[np.arange(len(indices)), indices] = 1.0
  return encoded


# ---------------------------------------------------------------------------
# Planetoid.

# The only globals the Planetoid pickles may name; anything else means the
# file is not a Planetoid file, and refusing it keeps unpickling safe.
_PLANETOID_PICKLE_GLOBALS = frozenset(
  {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("collections", "defaultdict"),
    ("__builtin__", "list"),
    ("builtins", "list"),
  }
)


class _PlanetoidUnpickler(pickle.Unpickler):
  """Unpickles the Python 2 Planetoid files without deprecated imports."""

  def find_class(self, module: str, name: str) -> Any:
    # The pickles name `scipy.sparse.csr`, a module path SciPy deprecates.
    if module in ("scipy.sparse.csr", "scipy.sparse._csr") and (
      name == "csr_matrix"
    ):
      return scipy.sparse.csr_matrix
    if (module, name) not in _PLANETOID_PICKLE_GLOBALS:
      raise pickle.UnpicklingError(
        f"unexpected object {module}.{name} in a Planetoid pickle"
      )
    return super().find_class(module, name)


def _read_planetoid_pickle(path: pathlib.Path) -> Any:
  """Loads one Python 2 Planetoid pickle.

  Raises:
    DataFileError: If the file cannot be unpickled.
  """
  try:
    with path.open("rb") as f:
      return _PlanetoidUnpickler(f, encoding="latin1").load()
  except Exception as error:  # A damaged pickle fails in many ways.
    truncated = isinstance(error, EOFError) or "truncated" in str(error)
    hint = "; the file ends early (truncated?)" if truncated else ""
    raise DataFileError(
      f"Cannot unpickle Planetoid file {path}: {error!r}{hint}."
    ) from error


def _as_matrix(value: Any, path: pathlib.Path) -> np.ndarray:
  """Returns a pickled sparse or dense matrix as dense float32 [rows, cols].

  Raises:
    DataFileError: If `value` is not a 2-D matrix.
  """
  if scipy.sparse.issparse(value):
    value = value.toarray()
  if not isinstance(value, np.ndarray) or value.ndim != 2:
    raise DataFileError(
      f"Planetoid file {path} should hold a 2-D matrix, found "
      f"{type(value).__name__} of shape {getattr(value, 'shape', None)}."
    )
  return value.astype(np.float32)


def _check_shape(
  matrix: np.ndarray, shape: tuple[int, int], path: pathlib.Path
) -> None:
  """Raises DataFileError naming `path` if `matrix` is not of `shape`."""
  if matrix.shape != shape:
    raise DataFileError(
      f"Planetoid file {path} has shape {matrix.shape}, expected {shape}."
    )


def _read_planetoid_test_index(path: pathlib.Path) -> np.ndarray:
  """Reads ``ind.<name>.test.index``: int64 [n_test] node ids, file order."""
  test_index = _read_int_table(path, num_columns=1)[:, 0]
  if len(np.unique(test_index)) != len(test_index):
    raise DataFileError(f"Planetoid file {path} repeats a test node id.")
  return test_index


def _planetoid_edges(
  adjacency: Any, num_nodes: int, path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
  """Turns the pickled ``{node: [neighbours]}`` map into canonical edges.

  Raises:
    DataFileError: If the map is not a mapping or names unknown nodes.
  """
  if not isinstance(adjacency, Mapping):
    raise DataFileError(
      f"Planetoid file {path} should hold a dict of neighbour lists, found "
      f"{type(adjacency).__name__}."
    )
  degrees = [len(neighbours) for neighbours in adjacency.values()]
  senders = np.repeat(
    np.fromiter(adjacency.keys(), dtype=np.int64, count=len(adjacency)),
    degrees,
  )
  receivers = np.fromiter(
    itertools.chain.from_iterable(adjacency.values()),
    dtype=np.int64,
    count=sum(degrees),
  )
  for ids in (senders, receivers):
    if ids.size and (ids.min() < 0 or ids.max() >= num_nodes):
      raise DataFileError(
        f"Planetoid file {path} names node ids outside 0..{num_nodes - 1} "
        f"(range found: {ids.min()}..{ids.max()})."
      )
  return canonical_edges(senders, receivers, num_nodes)


def _row_normalize(features: np.ndarray) -> np.ndarray:
  """Scales each row to sum 1; all-zero rows stay zero.

  Args:
    features: float32 ``[n_nodes, features]``, non-negative.

  Returns:
    float32 ``[n_nodes, features]``.
  """
  row_sums = features.sum(axis=1, keepdims=True, dtype=np.float64)
  normalized = np.divide(
    features,
    row_sums,
    out=np.zeros(features.shape, dtype=np.float64),
    where=row_sums != 0,
  )
  return normalized.astype(np.float32)


def load_planetoid(
  name: str,
  data_dir: str | os.PathLike | None,
  *,
  normalize_features: bool = True,
) -> NodeDataset:
  """Loads Cora, CiteSeer or PubMed with the standard public split.

  Follows Kipf & Welling's loader and PyG's ``Planetoid(split="public")``:
  test rows are placed at the node ids of ``test.index``; the 15 ids in
  CiteSeer's test range without a test row get zero features and class 0
  and are in no split; train is the first ``len(y)`` nodes, val the next 500,
  test the ``test.index`` nodes.

  Args:
    name: ``"cora"``, ``"citeseer"`` or ``"pubmed"`` (any case).
    data_dir: The data directory holding ``planetoid/<name>/ind.<name>.*``,
      or None for ``LORAP_DATA_DIR``.
    normalize_features: Whether to scale each feature row to sum 1.

  Returns:
    The dataset.

  Raises:
    ValueError: If `name` is not a Planetoid dataset.
    FileNotFoundError: If the data directory or a file is missing.
    DataFileError: If a file is corrupt or has unexpected content.
  """
  name = name.lower()
  if name not in _PLANETOID_NAMES:
    raise ValueError(
      f"Unknown Planetoid dataset {name!r}; expected one of "
      f"{', '.join(_PLANETOID_NAMES)}."
    )
  data_dir = resolve_data_dir(data_dir)
  paths = {
    suffix: require_file(data_dir, f"planetoid/{name}/ind.{name}.{suffix}")
    for suffix in PLANETOID_SUFFIXES
  }
  raw = {
    suffix: _read_planetoid_pickle(path)
    for suffix, path in paths.items()
    if suffix != "test.index"
  }
  matrices = {
    suffix: _as_matrix(raw[suffix], paths[suffix])
    for suffix in ("x", "y", "tx", "ty", "allx", "ally")
  }
  test_index = _read_planetoid_test_index(paths["test.index"])

  num_labelled_rows, num_features = matrices["allx"].shape
  num_classes = matrices["ally"].shape[1]
  num_train = matrices["x"].shape[0]
  expected_shapes = {
    "x": (num_train, num_features),
    "y": (num_train, num_classes),
    "tx": (len(test_index), num_features),
    "ty": (len(test_index), num_classes),
    "ally": (num_labelled_rows, num_classes),
  }
  for suffix, shape in expected_shapes.items():
    _check_shape(matrices[suffix], shape, paths[suffix])
  # Test ids follow the `allx` rows; the reordering below relies on it.
  if test_index.min() != num_labelled_rows:
    raise DataFileError(
      f"Planetoid file {paths['test.index']} starts its test ids at "
      f"{test_index.min()}, expected {num_labelled_rows} (the row count of "
      f"{paths['allx'].name})."
    )
  if num_train + _PLANETOID_VAL_SIZE > num_labelled_rows:
    raise DataFileError(
      f"Planetoid file {paths['allx']} has {num_labelled_rows} rows, too "
      f"few for {num_train} training and {_PLANETOID_VAL_SIZE} validation "
      "nodes."
    )

  # Row i of tx/ty belongs to node test_index[i]. Ids in the test range
  # without a row (15 in CiteSeer) keep zeros.
  num_nodes = int(test_index.max()) + 1
  features = np.zeros((num_nodes, num_features), dtype=np.float32)
  features[:num_labelled_rows] = matrices["allx"]
  features[test_index] = matrices["tx"]
  label_rows = np.zeros((num_nodes, num_classes), dtype=np.float32)
  label_rows[:num_labelled_rows] = matrices["ally"]
  label_rows[test_index] = matrices["ty"]
  # All-zero label rows become class 0, as in PyG; such nodes are in no split.
  labels = label_rows.argmax(axis=1).astype(np.int32)
  if normalize_features:
    features = _row_normalize(features)

  senders, receivers = _planetoid_edges(raw["graph"], num_nodes, paths["graph"])
  node_ids = np.arange(num_nodes)
  dataset = NodeDataset(
    name=name,
    graph=_single_graph(features, senders, receivers),
    labels=labels,
    train_mask=node_ids < num_train,
    val_mask=(node_ids >= num_train)
    & (node_ids < num_train + _PLANETOID_VAL_SIZE),
    test_mask=np.isin(node_ids, test_index),
    num_classes=num_classes,
  )
  source = f"Planetoid files {paths['graph'].parent}/ind.{name}.*"
  return validate_node_dataset(dataset, source=source)


# ---------------------------------------------------------------------------
# Text tokenising (GIN and TU formats).


class _Tokens(NamedTuple):
  """A whitespace-tokenised numeric text file.

  Attributes:
    values: float64 ``[n_tokens]``, every token parsed as a number.
    line_start: int64 ``[n_lines]``, the index of each line's first token.
    line_length: int64 ``[n_lines]``, the number of tokens on each line.
  """

  values: np.ndarray
  line_start: np.ndarray
  line_length: np.ndarray


def _tokenize(path: pathlib.Path, separators: bytes = b"") -> _Tokens:
  """Splits a text file into numeric tokens, remembering their lines.

  Tokenising the whole file at once with numpy is much faster than splitting
  each line in Python (REDDIT-BINARY has 860k lines).

  Args:
    path: The file.
    separators: Bytes treated as whitespace besides ASCII whitespace, e.g.
      ``b","``.

  Returns:
    The tokens; line ``i`` (0-based) holds ``values[line_start[i]:
    line_start[i] + line_length[i]]``.

  Raises:
    DataFileError: If a token is not a number.
  """
  data = path.read_bytes()
  for separator in separators:
    data = data.replace(bytes([separator]), b" ")
  raw = np.frombuffer(data, dtype=np.uint8)
  is_space = _IS_SPACE[raw]
  follows_space = np.ones_like(is_space)
  follows_space[1:] = is_space[:-1]
  token_starts = np.flatnonzero(~is_space & follows_space)
  newlines = np.flatnonzero(raw == ord("\n"))
  token_lines = np.searchsorted(newlines, token_starts)
  line_length = np.bincount(token_lines, minlength=len(newlines) + 1)
  line_start = np.cumsum(line_length) - line_length
  tokens = data.split()
  try:
    values = np.array(tokens, dtype=np.float64)
  except ValueError:
    bad = next(i for i, token in enumerate(tokens) if not _is_number(token))
    token = tokens[bad].decode(errors="replace")
    raise DataFileError(
      f"{path}, line {token_lines[bad] + 1}: {token!r} is not a number."
    ) from None
  return _Tokens(values, line_start.astype(np.int64), line_length)


def _is_number(token: bytes) -> bool:
  """Whether `token` parses as a float."""
  try:
    float(token)
  except ValueError:
    return False
  return True


def _as_integers(
  values: np.ndarray, lines: np.ndarray, path: pathlib.Path, what: str
) -> np.ndarray:
  """Checks that parsed values are integers and returns them as int64.

  Args:
    values: float64 ``[k]`` parsed tokens.
    lines: int ``[k]`` 0-based line of each value, for the error message.
    path: The file, for the error message.
    what: What the values are, for the error message.

  Returns:
    int64 ``[k]``.

  Raises:
    DataFileError: If a value is not an integer.
  """
  bad = ~np.isfinite(values) | (values != np.round(values))
  if bad.any():
    first = int(np.argmax(bad))
    raise DataFileError(
      f"{path}, line {lines[first] + 1}: {what} must be an integer, found "
      f"{values[first]}."
    )
  return values.astype(np.int64)


def _read_int_table(
  path: pathlib.Path, num_columns: int, separators: bytes = b","
) -> np.ndarray:
  """Reads a text table of integers, one row per non-blank line.

  Args:
    path: The file.
    num_columns: The number of integers each non-blank line must hold.
    separators: Bytes separating columns besides whitespace.

  Returns:
    int64 ``[n_rows, num_columns]``.

  Raises:
    DataFileError: If a line has another number of columns, or a value is
      not an integer.
  """
  tokens = _tokenize(path, separators)
  filled = np.flatnonzero(tokens.line_length)
  wrong = tokens.line_length[filled] != num_columns
  if wrong.any():
    line = filled[np.argmax(wrong)]
    raise DataFileError(
      f"{path}, line {line + 1}: expected {num_columns} value(s), found "
      f"{tokens.line_length[line]}."
    )
  value_lines = np.repeat(filled, num_columns)
  values = _as_integers(tokens.values, value_lines, path, "every value")
  return values.reshape(-1, num_columns)


# ---------------------------------------------------------------------------
# Graph-classification datasets: node features, splitting, folds.


class _RawGraphs(NamedTuple):
  """Graphs parsed from disk, before node features are chosen.

  Attributes:
    n_node: int64 ``[n_graphs]`` nodes per graph.
    node_tags: int64 ``[n_nodes_total]`` node tags (labels), all graphs.
    senders: int64 ``[n_edges]`` global node ids.
    receivers: int64 ``[n_edges]`` global node ids.
    labels: int64 ``[n_graphs]`` raw graph labels.
  """

  n_node: np.ndarray
  node_tags: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  labels: np.ndarray


def _check_node_features_option(node_features: str) -> None:
  """Raises ValueError unless `node_features` is a known option."""
  if node_features not in NODE_FEATURE_OPTIONS:
    raise ValueError(
      f"Unknown node_features option {node_features!r}; expected one of "
      f"{', '.join(repr(o) for o in NODE_FEATURE_OPTIONS)}."
    )


def _degree_features(degrees: np.ndarray) -> np.ndarray:
  """Degree features as Degree-Quant builds them for featureless graphs.

  Args:
    degrees: int ``[n_nodes_total]`` node degrees over the whole dataset.

  Returns:
    float32 ``[n_nodes_total, max_degree + 1]`` one-hot degrees if the
    maximum degree is below 1000, else float32 ``[n_nodes_total, 1]``
    standardised degrees.
  """
  max_degree = int(degrees.max(initial=0))
  if max_degree < _ONE_HOT_DEGREE_LIMIT:
    return _one_hot(degrees, max_degree + 1)
  # ddof=1 matches torch.std, which Degree-Quant uses.
  mean, std = degrees.mean(), degrees.std(ddof=1)
  return ((degrees - mean) / std).astype(np.float32)[:, None]


def _node_features(
  node_tags: np.ndarray, degrees: np.ndarray, node_features: str
) -> np.ndarray:
  """Builds the node features of a whole graph-classification dataset.

  Args:
    node_tags: int ``[n_nodes_total]`` node tags.
    degrees: int ``[n_nodes_total]`` node degrees.
    node_features: ``"auto"``, ``"tags"`` or ``"degree"``; ``"auto"`` uses
      tags when there is more than one distinct tag.

  Returns:
    float32 ``[n_nodes_total, features]``.
  """
  tag_values, tag_ids = np.unique(node_tags, return_inverse=True)
  if node_features == "auto":
    node_features = "tags" if len(tag_values) > 1 else "degree"
  if node_features == "tags":
    return _one_hot(tag_ids, len(tag_values))
  return _degree_features(degrees)


def _build_graph_dataset(
  name: str,
  raw: _RawGraphs,
  node_features: str,
  folds: tuple[Fold, ...],
  source: str,
) -> GraphDataset:
  """Canonicalises edges, builds features and splits into per-graph tuples.

  Args:
    name: The dataset name.
    raw: The parsed graphs; edges must not cross graphs.
    node_features: The node feature option.
    folds: The cross-validation folds.
    source: The files read, for error messages.

  Returns:
    The dataset, checked by `validate_graph_dataset`.

  Raises:
    DataFileError: If the dataset fails `validate_graph_dataset`, e.g. a
      graph without nodes.
  """
  num_nodes = int(raw.n_node.sum())
  senders, receivers = canonical_edges(raw.senders, raw.receivers, num_nodes)
  degrees = np.bincount(receivers, minlength=num_nodes)
  features = _node_features(raw.node_tags, degrees, node_features)
  node_offsets = np.concatenate([[0], np.cumsum(raw.n_node)])
  # Edges are sorted by receiver, so each graph's edges are one slice.
  edge_offsets = np.searchsorted(receivers, node_offsets)
  graphs = []
  for graph_id in range(len(raw.n_node)):
    nodes = slice(node_offsets[graph_id], node_offsets[graph_id + 1])
    edges = slice(edge_offsets[graph_id], edge_offsets[graph_id + 1])
    offset = np.int32(node_offsets[graph_id])
    graphs.append(
      _single_graph(
        features[nodes], senders[edges] - offset, receivers[edges] - offset
      )
    )
  labels, num_classes = _remap_labels(raw.labels)
  dataset = GraphDataset(
    name=name,
    graphs=tuple(graphs),
    labels=labels,
    num_classes=num_classes,
    folds=folds,
  )
  return validate_graph_dataset(dataset, source=source)


def _make_fold(
  train: np.ndarray, val: np.ndarray, test: np.ndarray, source: str
) -> Fold:
  """Sorts a fold's indices to int32 and checks that they are disjoint.

  Raises:
    DataFileError: If two of the index sets overlap; `source` names them.
  """
  fold = Fold(*(np.sort(part).astype(np.int32) for part in (train, val, test)))
  for first, second in itertools.combinations(Fold._fields, 2):
    shared = np.intersect1d(getattr(fold, first), getattr(fold, second))
    if shared.size:
      raise DataFileError(
        f"Fold from {source}: {first} and {second} share {shared.size} "
        f"graph(s), e.g. graph {shared[0]}."
      )
  return fold


def _folds_from_test_sets(
  test_sets: list[np.ndarray], train_pools: list[np.ndarray], source: str
) -> tuple[Fold, ...]:
  """Builds folds where val is the previous fold's test set.

  This is the Degree-Quant protocol: fold k tests on test set k, validates
  on test set k-1 (fold 1 on the last), and trains on the rest of its pool.

  Args:
    test_sets: Per fold, int ``[n_test_k]`` test graph indices.
    train_pools: Per fold, int graph indices to train on, before val and
      test are taken out.
    source: What the sets come from, for error messages.

  Returns:
    ``len(test_sets)`` folds.
  """
  folds = []
  for k, (test, pool) in enumerate(zip(test_sets, train_pools, strict=True)):
    val = test_sets[k - 1]
    train = np.setdiff1d(pool, np.union1d(test, val))
    folds.append(_make_fold(train, val, test, f"{source}, fold {k + 1}"))
  return tuple(folds)


# ---------------------------------------------------------------------------
# GIN / DGCNN single-text-file format.


def _gin_graph_headers(
  tokens: _Tokens, path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Walks the ``n label`` header lines of a GIN file.

  Args:
    tokens: The tokenised file.
    path: The file, for error messages.

  Returns:
    ``(header_lines, n_node, labels, end_line)``: int64 ``[n_graphs]`` each,
    and the 0-based line after the last graph.

  Raises:
    DataFileError: If the graph count, a header or the file length is wrong.
  """
  # Lines after the last non-blank one (e.g. after a final newline) do not
  # count, so that a truncated file is reported where its content ends.
  num_lines = int(np.flatnonzero(tokens.line_length).max(initial=-1)) + 1

  def header(line: int, count: int, what: str) -> np.ndarray:
    if tokens.line_length[line] != count:
      raise DataFileError(
        f"{path}, line {line + 1}: expected {what} ({count} value(s)), found "
        f"{tokens.line_length[line]} value(s)."
      )
    start = tokens.line_start[line]
    values = tokens.values[start : start + count]
    return _as_integers(values, np.full(count, line), path, what)

  if num_lines == 0:
    raise DataFileError(f"{path} is empty.")
  (num_graphs,) = header(0, 1, "the number of graphs")
  header_lines = np.empty(num_graphs, dtype=np.int64)
  n_node = np.empty(num_graphs, dtype=np.int64)
  labels = np.empty(num_graphs, dtype=np.int64)
  line = 1
  for graph_id in range(num_graphs):
    if line >= num_lines:
      raise DataFileError(
        f"{path}: the file ends after line {num_lines} but line 1 declares "
        f"{num_graphs} graphs and only {graph_id} were found (truncated?)."
      )
    n_node[graph_id], labels[graph_id] = header(
      line, 2, f"the header `num_nodes label` of graph {graph_id}"
    )
    if n_node[graph_id] < 0 or line + n_node[graph_id] >= num_lines:
      raise DataFileError(
        f"{path}, line {line + 1}: graph {graph_id} declares "
        f"{n_node[graph_id]} nodes but the file ends after line {num_lines} "
        "(truncated?)."
      )
    header_lines[graph_id] = line
    line += 1 + int(n_node[graph_id])
  trailing = np.flatnonzero(tokens.line_length[line:])
  if trailing.size:
    raise DataFileError(
      f"{path}, line {line + trailing[0] + 1}: unexpected content after the "
      f"{num_graphs} graphs declared on line 1."
    )
  return header_lines, n_node, labels, line


def _parse_gin_file(path: pathlib.Path) -> _RawGraphs:
  """Parses a DGCNN/GIN ``<NAME>.txt`` file.

  Node lines read ``tag m v1 .. vm [f1 .. fd]``; the optional continuous
  features ``f`` are ignored, as GIN's loader does.

  Args:
    path: The file.

  Returns:
    The raw graphs, with edges from every node to each listed neighbour.

  Raises:
    DataFileError: If the content does not follow the format; the message
      names the file and line.
  """
  tokens = _tokenize(path)
  header_lines, n_node, labels, end_line = _gin_graph_headers(tokens, path)
  is_node_line = np.ones(end_line, dtype=bool)
  is_node_line[0] = False
  is_node_line[header_lines] = False
  node_lines = np.flatnonzero(is_node_line)
  length = tokens.line_length[node_lines]
  start = tokens.line_start[node_lines]

  too_short = length < 2
  if too_short.any():
    line = node_lines[np.argmax(too_short)]
    raise DataFileError(
      f"{path}, line {line + 1}: expected a node line `tag num_neighbours "
      f"neighbours...`, found {tokens.line_length[line]} value(s)."
    )
  tags = _as_integers(tokens.values[start], node_lines, path, "a node tag")
  num_neighbours = _as_integers(
    tokens.values[start + 1], node_lines, path, "a neighbour count"
  )
  num_extra = length - 2 - num_neighbours
  bad_count = (num_neighbours < 0) | (num_extra < 0)
  if bad_count.any():
    i = np.argmax(bad_count)
    raise DataFileError(
      f"{path}, line {node_lines[i] + 1}: the node declares "
      f"{num_neighbours[i]} neighbours but lists {length[i] - 2}."
    )
  # Extra values are continuous features, so every node must have as many.
  inconsistent = num_extra != num_extra[0]
  if inconsistent.any():
    i = np.argmax(inconsistent)
    raise DataFileError(
      f"{path}, line {node_lines[i] + 1}: the node has {num_extra[i]} values "
      f"after its neighbours but line {node_lines[0] + 1} has "
      f"{num_extra[0]}; a neighbour count is wrong."
    )

  # Token index of every neighbour id, node by node.
  owner = np.repeat(np.arange(len(node_lines)), num_neighbours)
  first_of_owner = np.cumsum(num_neighbours) - num_neighbours
  rank = np.arange(len(owner)) - first_of_owner[owner]
  neighbours = _as_integers(
    tokens.values[start[owner] + 2 + rank],
    node_lines[owner],
    path,
    "a neighbour index",
  )
  graph_of_node = np.repeat(np.arange(len(n_node)), n_node)
  owner_graph_size = n_node[graph_of_node[owner]]
  out_of_range = (neighbours < 0) | (neighbours >= owner_graph_size)
  if out_of_range.any():
    i = np.argmax(out_of_range)
    raise DataFileError(
      f"{path}, line {node_lines[owner[i]] + 1}: neighbour index "
      f"{neighbours[i]} is outside 0..{owner_graph_size[i] - 1} "
      f"(graph {graph_of_node[owner[i]]} has {owner_graph_size[i]} nodes)."
    )
  node_offsets = np.cumsum(n_node) - n_node
  return _RawGraphs(
    n_node=n_node,
    node_tags=tags,
    senders=owner,
    receivers=neighbours + node_offsets[graph_of_node[owner]],
    labels=labels,
  )


def _read_graph_indices(
  data_dir: pathlib.Path, relative: str, num_graphs: int
) -> np.ndarray:
  """Reads a fold file of 0-based graph indices, one per line.

  Returns:
    int64 ``[n]``, in file order.

  Raises:
    DataFileError: If an index repeats or is out of range.
  """
  path = require_file(data_dir, relative)
  indices = _read_int_table(path, num_columns=1)[:, 0]
  out_of_range = (indices < 0) | (indices >= num_graphs)
  if out_of_range.any():
    raise DataFileError(
      f"{path}: graph index {indices[np.argmax(out_of_range)]} is outside "
      f"0..{num_graphs - 1}."
    )
  if len(np.unique(indices)) != len(indices):
    raise DataFileError(f"{path} lists a graph index twice.")
  return indices


def _gin_folds(
  data_dir: pathlib.Path, directory: str, num_graphs: int
) -> tuple[Fold, ...]:
  """Reads the DGCNN ``10fold_idx`` files into Degree-Quant-style folds."""
  fold_dir = f"gin/{directory}/10fold_idx"
  test_sets, train_pools = [], []
  for k in range(1, NUM_FOLDS + 1):
    test_sets.append(
      _read_graph_indices(data_dir, f"{fold_dir}/test_idx-{k}.txt", num_graphs)
    )
    train_pools.append(
      _read_graph_indices(data_dir, f"{fold_dir}/train_idx-{k}.txt", num_graphs)
    )
  return _folds_from_test_sets(test_sets, train_pools, fold_dir)


def _gin_directory(name: str) -> str:
  """Maps a dataset name (``"imdb-binary"``, ``"IMDBBINARY"``) to gin/<dir>."""
  aliases = dict(_GIN_DIRS)
  aliases.update({value.lower(): value for value in _GIN_DIRS.values()})
  return aliases.get(name.lower(), name)


def _dataset_name(directory: str, names_to_dirs: dict[str, str]) -> str:
  """Returns the `load_dataset` name for a directory, else the directory."""
  for name, known in names_to_dirs.items():
    if known == directory:
      return name
  return directory


def load_gin_format(
  name: str,
  data_dir: str | os.PathLike | None,
  *,
  node_features: str = "auto",
) -> GraphDataset:
  """Loads a graph-classification set in the DGCNN/GIN text format.

  Reads ``gin/<NAME>/<NAME>.txt`` and ``gin/<NAME>/10fold_idx/``. Graph
  labels are mapped to ``0 .. C-1`` in sorted order of the stored values.
  Fold k tests on ``test_idx-k``, validates on ``test_idx-(k-1)`` (fold 1 on
  fold 10) and trains on ``train_idx-k`` minus both.

  Args:
    name: The directory name (``MUTAG``, ``PROTEINS``, ``NCI1``,
      ``IMDBBINARY``, ``IMDBMULTI``, ``PTC``, ``REDDIT-BINARY``; any case,
      or the `load_dataset` name such as ``"imdb-binary"``). Other names are
      used as the directory name unchanged.
    data_dir: The data directory, or None for ``LORAP_DATA_DIR``.
    node_features: ``"auto"`` (one-hot tags if there is more than one
      distinct tag, else degree features), ``"tags"`` or ``"degree"``.

  Returns:
    The dataset.

  Raises:
    ValueError: If `node_features` is not a known option.
    FileNotFoundError: If the data directory or a file is missing.
    DataFileError: If a file is corrupt or malformed.
  """
  _check_node_features_option(node_features)
  data_dir = resolve_data_dir(data_dir)
  directory = _gin_directory(name)
  path = require_file(data_dir, f"gin/{directory}/{directory}.txt")
  raw = _parse_gin_file(path)
  folds = _gin_folds(data_dir, directory, len(raw.n_node))
  return _build_graph_dataset(
    _dataset_name(directory, _GIN_DIRS), raw, node_features, folds, str(path)
  )


# ---------------------------------------------------------------------------
# TUDataset raw text format.


def _read_tu_files(data_dir: pathlib.Path, directory: str) -> _RawGraphs:
  """Reads ``tu/<NAME>/<NAME>_*.txt`` into raw graphs.

  Returns:
    The raw graphs.

  Raises:
    DataFileError: If the files disagree with each other.
  """
  prefix = f"tu/{directory}/{directory}"
  paths = {
    part: require_file(data_dir, f"{prefix}_{part}.txt") for part in TU_PARTS
  }
  edges = _read_int_table(paths["A"], num_columns=2) - 1
  graph_of_node = _read_int_table(paths["graph_indicator"], 1)[:, 0] - 1
  labels = _read_int_table(paths["graph_labels"], 1)[:, 0]
  node_tags = _read_int_table(paths["node_labels"], 1)[:, 0]
  num_nodes, num_graphs = len(graph_of_node), len(labels)

  if len(node_tags) != num_nodes:
    raise DataFileError(
      f"{paths['node_labels']} has {len(node_tags)} lines, expected "
      f"{num_nodes} (one per line of {paths['graph_indicator'].name})."
    )
  _check_graph_indicator(graph_of_node, num_graphs, paths)
  bad_ids = (edges < 0) | (edges >= num_nodes)
  if bad_ids.any():
    line, column = np.unravel_index(np.argmax(bad_ids), bad_ids.shape)
    raise DataFileError(
      f"{paths['A']}, line {line + 1}: node id {edges[line, column] + 1} is "
      f"outside 1..{num_nodes} (the lines of "
      f"{paths['graph_indicator'].name})."
    )
  senders, receivers = edges[:, 0], edges[:, 1]
  crossing = graph_of_node[senders] != graph_of_node[receivers]
  if crossing.any():
    line = int(np.argmax(crossing))
    raise DataFileError(
      f"{paths['A']}, edge {line + 1}: nodes {senders[line] + 1} and "
      f"{receivers[line] + 1} are in different graphs."
    )
  n_node = np.bincount(graph_of_node, minlength=num_graphs)
  return _RawGraphs(n_node, node_tags, senders, receivers, labels)


def _check_graph_indicator(
  graph_of_node: np.ndarray,
  num_graphs: int,
  paths: Mapping[str, pathlib.Path],
) -> None:
  """Checks that graph ids run 0, 0, .., 1, .., each graph one node range.

  Args:
    graph_of_node: int ``[n_nodes]`` 0-based graph id of every node.
    num_graphs: The number of graphs (lines of the graph labels).
    paths: The TU files by part, for error messages.

  Raises:
    DataFileError: Naming the line of the first bad id, or the first graph
      without nodes.
  """
  path = paths["graph_indicator"]
  labels_name = paths["graph_labels"].name
  if len(graph_of_node) == 0:
    raise DataFileError(f"{path} lists no node.")
  out_of_range = (graph_of_node < 0) | (graph_of_node >= num_graphs)
  if out_of_range.any():
    line = int(np.argmax(out_of_range))
    raise DataFileError(
      f"{path}, line {line + 1}: graph id {graph_of_node[line] + 1} is "
      f"outside 1..{num_graphs} (one graph per line of {labels_name})."
    )
  decreasing = np.diff(graph_of_node) < 0
  if decreasing.any():
    line = int(np.argmax(decreasing)) + 1
    raise DataFileError(
      f"{path}, line {line + 1}: graph id {graph_of_node[line] + 1} follows "
      f"{graph_of_node[line - 1] + 1}; ids must not decrease, so that each "
      "graph's nodes are consecutive."
    )
  n_node = np.bincount(graph_of_node, minlength=num_graphs)
  if not n_node.all():
    graph = int(np.argmin(n_node))
    raise DataFileError(
      f"{path}: graph {graph + 1} (line {graph + 1} of {labels_name}) has no "
      "node; every graph needs at least one."
    )


def _stratified_folds(
  labels: np.ndarray, num_folds: int, seed: int
) -> tuple[Fold, ...]:
  """A seeded stratified k-fold split; val is the previous fold's test set.

  Each class is shuffled and dealt round-robin to the folds, continuing
  where the previous class stopped, so that per-class and total fold sizes
  differ by at most one.

  Args:
    labels: int ``[n_graphs]`` class labels.
    num_folds: The number of folds.
    seed: Seed of the shuffle.

  Returns:
    `num_folds` folds that together test every graph once.
  """
  rng = np.random.default_rng(seed)
  fold_of = np.empty(len(labels), dtype=np.int64)
  dealt = 0
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    fold_of[members] = (dealt + np.arange(len(members))) % num_folds
    dealt += len(members)
  test_sets = [np.flatnonzero(fold_of == k) for k in range(num_folds)]
  everything = np.arange(len(labels))
  return _folds_from_test_sets(
    test_sets, [everything] * num_folds, "the stratified split"
  )


def load_tu(
  name: str,
  data_dir: str | os.PathLike | None,
  *,
  node_features: str = "auto",
  seed: int = 12345,
) -> GraphDataset:
  """Loads a TUDataset set from its raw text files.

  Reads ``tu/<NAME>/<NAME>_{A,graph_indicator,graph_labels,node_labels}.txt``
  (continuous node attributes and edge labels are not used). Graph labels
  are mapped to ``0 .. C-1`` in sorted order of the stored values. The folds
  are a seeded stratified 10-fold split; fold k validates on fold k-1's test
  set and trains on the remaining eight.

  Args:
    name: ``MUTAG``, ``PROTEINS`` or ``NCI1`` (any case, with or without a
      ``tu-`` prefix). Other names are used as the directory name unchanged.
    data_dir: The data directory, or None for ``LORAP_DATA_DIR``.
    node_features: ``"auto"``, ``"tags"`` or ``"degree"``, as in
      `load_gin_format`; the tags are the TU node labels.
    seed: Seed of the fold split.

  Returns:
    The dataset.

  Raises:
    ValueError: If `node_features` is not a known option.
    FileNotFoundError: If the data directory or a file is missing.
    DataFileError: If a file is corrupt or malformed.
  """
  _check_node_features_option(node_features)
  data_dir = resolve_data_dir(data_dir)
  key = name.lower()
  if not key.startswith("tu-"):
    key = f"tu-{key}"
  directory = _TU_DIRS.get(key, name.removeprefix("tu-"))
  raw = _read_tu_files(data_dir, directory)
  folds = _stratified_folds(raw.labels, NUM_FOLDS, seed)
  return _build_graph_dataset(
    _dataset_name(directory, _TU_DIRS),
    raw,
    node_features,
    folds,
    f"TU files {data_dir / 'tu' / directory}/{directory}_*.txt",
  )


# ---------------------------------------------------------------------------
# Name-based entry point.


def _is_npz_file_name(name: str) -> bool:
  """Whether `name` is ``npz/<file>.npz``, an ``.npz`` in the data dir."""
  return name.lower().startswith("npz/") and name.lower().endswith(".npz")


def _known_name(name: str) -> str:
  """Returns the lower-case dataset name, or raises ValueError.

  ``npz/<file>.npz`` names keep their case: they are file paths.
  """
  if _is_npz_file_name(name):
    return name
  key = name.lower()
  if key not in DATASET_NAMES:
    raise ValueError(
      f"Unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}"
      ", or npz/<file>.npz for any .npz graph in the data directory."
    )
  return key


def is_node_dataset(name: str) -> bool:
  """Whether `name` is a node-classification dataset (case-insensitive).

  Raises:
    ValueError: If `name` is not in `DATASET_NAMES` or ``npz/<file>.npz``.
  """
  key = _known_name(name)
  return (
    key in _PLANETOID_NAMES
    or key in _NPZ_NAMES
    or key == _CSBM_NAME
    or _is_npz_file_name(key)
  )


def load_dataset(
  name: str, data_dir: str | os.PathLike | None = None, **options: Any
) -> NodeDataset | GraphDataset:
  """Loads a benchmark dataset by name.

  Args:
    name: One of `DATASET_NAMES`, case-insensitive: ``cora``, ``citeseer``,
      ``pubmed`` (Planetoid); ``amazon-photo``, ``amazon-computers``, or
      ``npz/<file>.npz`` for any ``.npz`` graph in the data directory
      (`npz.load_npz_graph`, a random split per seed); ``csbm`` (a
      synthetic graph, `csbm.make_csbm`; `data_dir` is not read); ``mutag``,
      ``proteins``, ``nci1``, ``imdb-binary``, ``imdb-multi``, ``ptc``,
      ``reddit-binary`` (GIN format); ``tu-mutag``, ``tu-proteins``,
      ``tu-nci1`` (TU raw text); ``mnist-superpixels``
      (`superpixels.load_mnist_superpixels`); ``aqsol`` (graph regression,
      `molecules.load_aqsol`).
    data_dir: The data directory, or None for ``LORAP_DATA_DIR``.
    **options: Keyword options of the loader: `load_planetoid`,
      `npz.load_npz_graph`, `csbm.make_csbm`, `load_gin_format`, `load_tu`,
      `superpixels.load_mnist_superpixels` or `molecules.load_aqsol`.

  Returns:
    A `NodeDataset` for Planetoid, ``.npz`` and ``csbm`` names, else a
    `GraphDataset`.

  Raises:
    ValueError: If `name` or an option value is unknown.
    FileNotFoundError: If the data directory or a file is missing.
    DataFileError: If a file is corrupt or malformed.
  """
  key = _known_name(name)
  if key == _CSBM_NAME:
    from lorap_jax._src.data import csbm

    return csbm.make_csbm(**options)
  data_dir = resolve_data_dir(data_dir)
  if key in _PLANETOID_NAMES:
    return load_planetoid(key, data_dir, **options)
  # Imported here: these modules use this one's helpers.
  if key in _NPZ_NAMES or _is_npz_file_name(key):
    from lorap_jax._src.data import npz

    return npz.load_amazon(key, data_dir, **options)
  if key == _MNIST_NAME:
    from lorap_jax._src.data import superpixels

    return superpixels.load_mnist_superpixels(data_dir, **options)
  if key == _AQSOL_NAME:
    from lorap_jax._src.data import molecules

    return molecules.load_aqsol(data_dir, **options)
  if key in _GIN_DIRS:
    return load_gin_format(_GIN_DIRS[key], data_dir, **options)
  return load_tu(_TU_DIRS[key], data_dir, **options)
