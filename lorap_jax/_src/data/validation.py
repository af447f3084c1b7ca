"""Checks of datasets at the boundary, in one place, before any training.

Every loader passes its result through `validate_node_dataset` or
`validate_graph_dataset` right before returning it, and datasets built by
hand should go through them too. Messages name the graph, the array, the
position and the offending value.

Refused (`DatasetError`, or `DataFileError` naming the files when a loader
gives its ``source``):

* edge indices that are not integers, not 1-D arrays of equal length,
  negative, or not below the graph's node count;
* node features that are not 2-D with one row per node, not numbers, NaN or
  infinite, or without columns; ``n_node`` / ``n_edge`` that disagree with
  the arrays;
* graphs without nodes (graph datasets name the graph);
* labels that are not integers, one per node or graph, in
  ``0 .. num_classes - 1``; regression targets that are not finite
  numbers, one per graph;
* edge features (``edges``) that are not numbers with one row per edge,
  or that hold NaN or infinite values, or that come with edges the check
  would have to rewrite (it cannot know how to merge their features);
* a per-seed ``split_fn`` that is not callable;
* node masks that are not bool, of the wrong length, empty or overlapping;
  folds whose graph indices are not integers, out of range, repeated or
  shared between train, val and test (an empty part is allowed: tiny toy
  sets have them).

Handled, not refused:

* integer, boolean and float64 features are cast to float32;
* self-loops, duplicate edges and edges listed in one direction only: the
  edges are rewritten as the loaders write them (both directions of every
  edge once, no self-loops, sorted by (receiver, sender)); the layers add
  their own self-loops where the architecture wants them;
* graphs without edges and isolated nodes are valid as they are.

`validate_prompt_sizes` is the check where the model meets the dataset:
prompts larger than the features they act on are refused.
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jraph
import numpy as np

from lorap_jax._src.data.containers import (
  GRAPH_TASKS,
  Fold,
  GraphDataset,
  NodeDataset,
)
from lorap_jax._src.data.files import DataFileError, DatasetError

# Signature: fail(problem) raises the error, prefixed with where it is.
_FailFn = Callable[[str], NoReturn]
_MASKS = ("train_mask", "val_mask", "test_mask")


def canonical_edges(
  senders: np.ndarray, receivers: np.ndarray, num_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Symmetrises edges and drops self-loops and duplicates.

  Args:
    senders: int ``[n_edges]`` node ids in ``0 .. num_nodes - 1``.
    receivers: int ``[n_edges]`` node ids in ``0 .. num_nodes - 1``.
    num_nodes: The number of nodes.

  Returns:
    ``(senders, receivers)``, int32 ``[n_directed]``, holding both directions
    of every edge once, sorted by (receiver, sender).

  Examples:
    >>> senders, receivers = canonical_edges([0, 0, 1, 2], [1, 1, 1, 0], 3)
    >>> senders.tolist(), receivers.tolist()
    ([1, 2, 0, 0], [0, 0, 1, 2])
  """
  senders = np.asarray(senders, dtype=np.int64)
  receivers = np.asarray(receivers, dtype=np.int64)
  both_senders = np.concatenate([senders, receivers])
  both_receivers = np.concatenate([receivers, senders])
  keep = both_senders != both_receivers
  # One sort key per edge, so that one sort orders and exposes duplicates
  # (a plain sort is several times faster than np.unique's hashing here).
  base = max(num_nodes, 1)
  keys = np.sort(both_receivers[keep] * base + both_senders[keep])
  first_of_kind = np.ones(len(keys), dtype=bool)  # also when keys is empty
  first_of_kind[1:] = keys[1:] != keys[:-1]
  keys = keys[first_of_kind]
  return (keys % base).astype(np.int32), (keys // base).astype(np.int32)


def _is_canonical(
  senders: np.ndarray, receivers: np.ndarray, num_nodes: int
) -> bool:
  """Whether `canonical_edges` would return the same ids (any int dtype)."""
  base = max(num_nodes, 1)
  keys = receivers.astype(np.int64) * base + senders
  reversed_keys = senders.astype(np.int64) * base + receivers
  return bool(
    np.all(senders != receivers)
    and np.all(keys[1:] > keys[:-1])  # sorted, so no duplicates
    and np.array_equal(np.sort(reversed_keys), keys)  # both directions
  )


def _failer(name: Any, source: str | None) -> _FailFn:
  """Returns the function that raises a dataset's errors."""
  where = source if source is not None else f"Dataset {name!r}"
  error_type = DataFileError if source is not None else DatasetError

  def fail(problem: str) -> NoReturn:
    raise error_type(f"{where}: {problem}")

  return fail


def _prefixed(fail: _FailFn, prefix: str) -> _FailFn:
  """`fail` with `prefix` (e.g. ``"graph 3: "``) before every problem."""

  def fail_with_prefix(problem: str) -> NoReturn:
    fail(prefix + problem)

  return fail_with_prefix


def _count(value: Any, what: str, fail: _FailFn) -> int:
  """Returns the single entry of an ``n_node`` / ``n_edge`` array."""
  counts = np.asarray(value).reshape(-1)
  if counts.shape != (1,) or counts.dtype.kind not in "iu":
    fail(
      f"{what} must hold one integer (one graph per GraphsTuple), found "
      f"{counts.tolist()!r}."
    )
  return int(counts[0])


def _int32_count(value: Any, count: int) -> np.ndarray:
  """`value` if it is the int32 array ``[count]``, else that array."""
  if (
    isinstance(value, np.ndarray)
    and value.dtype == np.int32
    and value.shape == (1,)
    and value[0] == count
  ):
    return value
  return np.array([count], dtype=np.int32)


def _graph_arrays(
  graph: Any, fail: _FailFn
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks one graph's structure: ``(nodes, senders, receivers)``.

  Shapes, dtypes and counts only; the values are checked over all graphs at
  once by the callers.

  Returns:
    The node features (not yet cast) and the edge arrays as numpy arrays.
  """
  if not isinstance(graph, jraph.GraphsTuple):
    fail(f"expected a jraph.GraphsTuple, found {type(graph).__name__}.")
  if graph.nodes is None:
    fail("the node features (nodes) are None.")
  nodes = np.asarray(graph.nodes)
  if nodes.ndim != 2:
    fail(
      f"node features must be 2-D [n_nodes, features], found shape "
      f"{nodes.shape}."
    )
  if nodes.dtype.kind not in "biuf":
    fail(f"node features must be numbers, found dtype {nodes.dtype}.")
  if nodes.shape[0] == 0:
    fail("the graph has no nodes; every graph needs at least one.")
  if nodes.shape[1] == 0:
    fail("node features have no columns (width 0).")
  n_node = _count(graph.n_node, "n_node", fail)
  if n_node != nodes.shape[0]:
    fail(f"n_node says {n_node} nodes but the features have {len(nodes)} rows.")
  edge_arrays = []
  for what in ("senders", "receivers"):
    ids = getattr(graph, what)
    ids = np.asarray([] if ids is None else ids)
    if ids.size == 0 and (ids.dtype.kind not in "iu" or ids.ndim != 1):
      ids = np.zeros(0, dtype=np.int32)  # [] (float64) and None: no edges
    if ids.dtype.kind not in "iu":
      fail(f"{what} must hold integer node ids, found dtype {ids.dtype}.")
    if ids.ndim != 1:
      fail(f"{what} must be 1-D [n_edges], found shape {ids.shape}.")
    edge_arrays.append(ids)
  senders, receivers = edge_arrays
  if len(senders) != len(receivers):
    fail(
      f"senders and receivers must pair up, found {len(senders)} senders "
      f"and {len(receivers)} receivers."
    )
  n_edge = _count(graph.n_edge, "n_edge", fail)
  if n_edge != len(senders):
    fail(f"n_edge says {n_edge} edges but senders has {len(senders)}.")
  if graph.edges is not None:
    _check_edge_features(np.asarray(graph.edges), len(senders), fail)
  return nodes, senders, receivers


def _check_edge_features(edges: np.ndarray, n_edge: int, fail: _FailFn):
  """Refuses edge features that are not finite numbers, one row per edge."""
  if edges.ndim == 0 or edges.shape[0] != n_edge:
    fail(
      f"edge features (edges) must have one row per edge, shape "
      f"[{n_edge}, ...], found {edges.shape}."
    )
  if edges.dtype.kind not in "biuf":
    fail(f"edge features must be numbers, found dtype {edges.dtype}.")
  if edges.dtype.kind == "f" and not np.isfinite(edges).all():
    fail("edge features hold NaN or infinite values.")


def _first_bad_entry(bad: np.ndarray, node_offsets: np.ndarray) -> tuple:
  """``(row, column, "graph g, row r" or "row r")`` of the first True."""
  row, column = np.unravel_index(np.argmax(bad), bad.shape)
  where = f"row {row}"
  if len(node_offsets) > 2:
    graph_id = int(np.searchsorted(node_offsets, row, side="right")) - 1
    where = f"graph {graph_id}, row {row - node_offsets[graph_id]}"
  return row, column, where


def _checked_features(
  stacked: np.ndarray, node_offsets: np.ndarray, fail: _FailFn
) -> np.ndarray:
  """Refuses NaN or infinite features; returns them as float32.

  Args:
    stacked: ``[n_nodes_total, features]`` numbers, all graphs stacked.
    node_offsets: int ``[n_graphs + 1]`` first row of each graph, then the
      total; one graph: ``[0, n_nodes]``.
    fail: Raises the error.

  Returns:
    float32 ``[n_nodes_total, features]``, `stacked` itself if it is.
  """
  if stacked.dtype.kind == "f":
    bad = ~np.isfinite(stacked)
    if bad.any():
      num_nan = int(np.isnan(stacked).sum())
      num_inf = int(bad.sum()) - num_nan
      row, column, where = _first_bad_entry(bad, node_offsets)
      fail(
        f"node features hold {num_nan} NaN and {num_inf} infinite value(s); "
        f"the first is in {where}, column {column}: {stacked[row, column]}."
      )
  # Overflow is reported below, with the value, rather than warned about.
  with np.errstate(over="ignore", invalid="ignore"):
    features = stacked.astype(np.float32, copy=False)
  if features is not stacked:
    bad = ~np.isfinite(features)
    if bad.any():
      row, column, where = _first_bad_entry(bad, node_offsets)
      fail(
        f"node features hold {int(bad.sum())} value(s) beyond the float32 "
        f"range; the first is in {where}, column {column}: "
        f"{stacked[row, column]}."
      )
  return features


def _check_edge_values(
  ids: np.ndarray,
  what: str,
  edge_graph: np.ndarray,
  edge_offsets: np.ndarray,
  graph_sizes: np.ndarray,
  fail: _FailFn,
  named_graphs: bool,
) -> None:
  """Refuses negative node ids and ids not below their graph's node count.

  Args:
    ids: int ``[n_edges_total]`` local node ids, all graphs' edges in order.
    what: ``"senders"`` or ``"receivers"``.
    edge_graph: int ``[n_edges_total]`` graph of each edge.
    edge_offsets: int ``[n_graphs]`` first edge of each graph.
    graph_sizes: int ``[n_graphs]`` nodes per graph.
    fail: Raises the error.
    named_graphs: Whether to name the graph (graph datasets).
  """
  size = graph_sizes[edge_graph]
  bad = (ids < 0) | (ids >= size)
  if not bad.any():
    return
  first = int(np.argmax(bad))
  graph_id = int(edge_graph[first])
  position = first - int(edge_offsets[graph_id])
  prefix = f"graph {graph_id}: " if named_graphs else ""
  value, num_nodes = int(ids[first]), int(size[first])
  if value < 0:
    problem = "is negative"
  else:
    problem = (
      f"is out of range: the graph has {num_nodes} node(s), ids "
      f"0..{num_nodes - 1}"
    )
  fail(
    f"{prefix}{what}[{position}] = {value} {problem} ({int(bad.sum())} bad "
    f"id(s) in {what})."
  )


def _checked_graphs(
  graphs: Sequence[Any], fail: _FailFn, named_graphs: bool
) -> list[jraph.GraphsTuple]:
  """Checks graphs and returns them with float32 features, canonical edges.

  Args:
    graphs: The graphs, one `jraph.GraphsTuple` each.
    fail: Raises the error.
    named_graphs: Whether messages name the graph (graph datasets).

  Returns:
    The graphs, the same objects where nothing had to change.
  """
  arrays = []
  width = None
  for graph_id, graph in enumerate(graphs):
    graph_fail = (
      _prefixed(fail, f"graph {graph_id}: ") if named_graphs else fail
    )
    nodes, senders, receivers = _graph_arrays(graph, graph_fail)
    if width is None:
      width = nodes.shape[1]
    elif nodes.shape[1] != width:
      graph_fail(
        f"node features have {nodes.shape[1]} columns but graph 0's have "
        f"{width}; every graph needs the same width."
      )
    arrays.append((nodes, senders, receivers))

  graph_sizes = np.array([len(a[0]) for a in arrays], dtype=np.int64)
  edge_counts = np.array([len(a[1]) for a in arrays], dtype=np.int64)
  node_offsets = np.concatenate([[0], np.cumsum(graph_sizes)])
  edge_offsets = np.concatenate([[0], np.cumsum(edge_counts)])[:-1]
  edge_graph = np.repeat(np.arange(len(arrays)), edge_counts)
  if len(arrays) == 1:
    stacked = arrays[0][0]
  else:
    stacked = np.concatenate([a[0] for a in arrays])
  all_nodes = _checked_features(stacked, node_offsets, fail)
  all_edges = {}
  for column, what in ((1, "senders"), (2, "receivers")):
    ids = np.concatenate([a[column].astype(np.int64) for a in arrays])
    _check_edge_values(
      ids, what, edge_graph, edge_offsets, graph_sizes, fail, named_graphs
    )
    all_edges[what] = ids + node_offsets[:-1][edge_graph]  # global ids
  # Edges never cross graphs, so all graphs are canonical iff the stacked
  # graph is: one check instead of one per graph.
  stacked_canonical = _is_canonical(
    all_edges["senders"], all_edges["receivers"], int(node_offsets[-1])
  )

  checked = []
  for graph_id, (graph, (nodes, senders, receivers)) in enumerate(
    zip(graphs, arrays, strict=True)
  ):
    num_nodes = len(nodes)
    if not stacked_canonical and not _is_canonical(
      senders, receivers, num_nodes
    ):
      if graph.edges is not None:
        graph_fail = (
          _prefixed(fail, f"graph {graph_id}: ") if named_graphs else fail
        )
        graph_fail(
          "the edges are not in canonical form (both directions of every "
          "edge once, no self-loops, sorted by (receiver, sender)) and carry "
          "edge features, which cannot be rewritten with them; build them "
          "with canonical_edges and align the features."
        )
      senders, receivers = canonical_edges(senders, receivers, num_nodes)
    if nodes.dtype == np.float32:
      features = nodes
    else:  # a view of the rows cast (and checked) above
      features = all_nodes[node_offsets[graph_id] : node_offsets[graph_id + 1]]
    fixed = {
      "nodes": features,
      # Ids are below the node count, so the documented int32 holds them.
      "senders": senders.astype(np.int32, copy=False),
      "receivers": receivers.astype(np.int32, copy=False),
      "n_node": _int32_count(graph.n_node, num_nodes),
      "n_edge": _int32_count(graph.n_edge, len(senders)),
    }
    changes = {
      field: value
      for field, value in fixed.items()
      if value is not getattr(graph, field)
    }
    checked.append(graph._replace(**changes) if changes else graph)
  return checked


def _checked_labels(
  labels: Any, count: int, num_classes: Any, what: str, fail: _FailFn
) -> np.ndarray:
  """Checks ``[count]`` integer labels in ``0 .. num_classes - 1``.

  Returns:
    int32 ``[count]`` (the same array when it already is).
  """
  if (
    not isinstance(num_classes, int | np.integer)
    or isinstance(num_classes, bool)
    or num_classes < 1
  ):
    fail(f"num_classes={num_classes!r} must be an integer >= 1.")
  labels = np.asarray(labels)
  if labels.dtype.kind not in "iu":
    fail(f"labels must be integers, found dtype {labels.dtype}.")
  if labels.shape != (count,):
    fail(
      f"labels must have shape ({count},), one per {what}, found "
      f"{labels.shape}."
    )
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    first = int(np.argmax(bad))
    fail(
      f"labels[{first}] = {labels[first]} is outside 0..{num_classes - 1} "
      f"(num_classes={num_classes}; {int(bad.sum())} bad label(s))."
    )
  return labels if labels.dtype == np.int32 else labels.astype(np.int32)


def _checked_targets(
  targets: Any, count: int, num_classes: Any, fail: _FailFn
) -> np.ndarray:
  """Checks ``[count]`` finite regression targets (one output).

  Returns:
    float32 ``[count]`` (the same array when it already is).
  """
  if num_classes != 1 or isinstance(num_classes, bool):
    fail(f"num_classes={num_classes!r} must be 1 (one output) for regression.")
  targets = np.asarray(targets)
  if targets.dtype.kind not in "iuf":
    fail(f"regression targets must be numbers, found dtype {targets.dtype}.")
  if targets.shape != (count,):
    fail(
      f"regression targets must have shape ({count},), one per graph, found "
      f"{targets.shape}."
    )
  with np.errstate(over="ignore"):
    as_float32 = targets.astype(np.float32, copy=False)
  bad = ~np.isfinite(as_float32)
  if bad.any():
    first = int(np.argmax(bad))
    fail(
      f"regression target {first} = {targets[first]} is not a finite "
      f"float32 ({int(bad.sum())} bad target(s))."
    )
  return as_float32


def _check_disjoint(
  parts: dict[str, np.ndarray], what: str, fail: _FailFn
) -> None:
  """Refuses index sets (or masks) that share an element."""
  for first, second in itertools.combinations(parts, 2):
    a, b = parts[first], parts[second]
    masks = a.dtype == bool
    shared = np.flatnonzero(a & b) if masks else np.intersect1d(a, b)
    if shared.size:
      fail(
        f"{first} and {second} share {shared.size} {what}(s), e.g. {what} "
        f"{shared[0]}; they must be disjoint."
      )


def validate_node_dataset(
  dataset: NodeDataset, *, source: str | None = None
) -> NodeDataset:
  """Checks a node-classification dataset before it is trained on.

  See the module docstring for what is refused and what is handled.

  Args:
    dataset: The dataset, e.g. built by hand from numpy arrays.
    source: What the dataset was read from (a loader's files); errors then
      are `DataFileError`s that name it.

  Returns:
    The dataset, or a copy with float32 features, canonical edges and int32
    labels where they were not.

  Raises:
    DatasetError: If the dataset is inconsistent (`DataFileError` when
      `source` is given).

  Examples:
    >>> import jraph, numpy as np
    >>> graph = jraph.GraphsTuple(
    ...   nodes=np.eye(3, dtype=np.int64), edges=None, globals=None,
    ...   senders=np.array([0, 1, 1]), receivers=np.array([1, 0, 1]),
    ...   n_node=np.array([3]), n_edge=np.array([3]))
    >>> masks = [np.array(m, dtype=bool) for m in np.eye(3)]
    >>> dataset = validate_node_dataset(
    ...   NodeDataset("toy", graph, np.array([0, 1, 0]), *masks, 2))
    >>> dataset.graph.nodes.dtype, dataset.graph.senders.tolist()
    (dtype('float32'), [1, 0])
  """
  fail = _failer(getattr(dataset, "name", None), source)
  if not isinstance(dataset, NodeDataset):
    fail(f"expected a NodeDataset, found {type(dataset).__name__}.")
  (graph,) = _checked_graphs([dataset.graph], fail, named_graphs=False)
  num_nodes = graph.nodes.shape[0]
  labels = _checked_labels(
    dataset.labels, num_nodes, dataset.num_classes, "node", fail
  )
  masks = {}
  for name in _MASKS:
    mask = np.asarray(getattr(dataset, name))
    if mask.dtype != bool:
      fail(f"{name} must be a bool array, found dtype {mask.dtype}.")
    if mask.shape != (num_nodes,):
      fail(
        f"{name} must have shape ({num_nodes},), one entry per node, found "
        f"{mask.shape}."
      )
    if not mask.any():
      fail(f"{name} selects no node.")
    masks[name] = mask
  _check_disjoint(masks, "node", fail)
  split_fn = getattr(dataset, "split_fn", None)
  if split_fn is not None and not callable(split_fn):
    fail(f"split_fn must be None or callable, found {split_fn!r}.")
  if graph is dataset.graph and labels is dataset.labels:
    return dataset
  return dataclasses.replace(dataset, graph=graph, labels=labels)


def _checked_fold(
  fold: Any, num_graphs: int, fail: _FailFn
) -> tuple[Fold, bool]:
  """Checks one fold; returns it as a `Fold` and whether it changed."""
  try:
    parts = dict(zip(Fold._fields, fold, strict=True))
  except (TypeError, ValueError):
    fail(f"a fold must be (train, val, test) index arrays, found {fold!r}.")
  arrays = {}
  for name, indices in parts.items():
    indices = np.asarray(indices)
    if indices.size == 0:  # [] is float64, but an empty part is fine
      indices = indices.astype(np.int32).reshape(-1)
    if indices.dtype.kind not in "iu" or indices.ndim != 1:
      fail(
        f"{name} must be 1-D integer graph indices, found dtype "
        f"{indices.dtype} and shape {indices.shape}."
      )
    bad = (indices < 0) | (indices >= num_graphs)
    if bad.any():
      first = int(np.argmax(bad))
      fail(
        f"{name}[{first}] = {indices[first]} is outside 0..{num_graphs - 1} "
        f"({num_graphs} graphs)."
      )
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
      fail(f"{name} lists graph {unique[np.argmax(counts > 1)]} twice.")
    arrays[name] = indices
  _check_disjoint(arrays, "graph", fail)
  unchanged = isinstance(fold, Fold) and all(
    arrays[name] is getattr(fold, name) and arrays[name].dtype == np.int32
    for name in Fold._fields
  )
  if unchanged:
    return fold, False
  fold = Fold(*(np.sort(arrays[n]).astype(np.int32) for n in Fold._fields))
  return fold, True


def validate_graph_dataset(
  dataset: GraphDataset, *, source: str | None = None
) -> GraphDataset:
  """Checks a graph-classification dataset before it is trained on.

  See the module docstring for what is refused and what is handled.

  Args:
    dataset: The dataset, e.g. built by hand from numpy arrays.
    source: What the dataset was read from (a loader's files); errors then
      are `DataFileError`s that name it.

  Returns:
    The dataset, or a copy with float32 features, canonical edges, int32
    labels and sorted int32 folds where they were not.

  Raises:
    DatasetError: If the dataset is inconsistent (`DataFileError` when
      `source` is given); a graph without nodes is named by its index.
  """
  fail = _failer(getattr(dataset, "name", None), source)
  if not isinstance(dataset, GraphDataset):
    fail(f"expected a GraphDataset, found {type(dataset).__name__}.")
  if len(dataset.graphs) == 0:
    fail("the dataset holds no graphs.")
  graphs = _checked_graphs(dataset.graphs, fail, named_graphs=True)
  if dataset.task not in GRAPH_TASKS:
    fail(f"task={dataset.task!r} is not one of {GRAPH_TASKS}.")
  if dataset.task == "regression":
    labels = _checked_targets(
      dataset.labels, len(graphs), dataset.num_classes, fail
    )
  else:
    labels = _checked_labels(
      dataset.labels, len(graphs), dataset.num_classes, "graph", fail
    )
  if len(dataset.folds) == 0:
    fail("the dataset has no folds.")
  folds, changed = [], False
  for k, fold in enumerate(dataset.folds):
    fold, fold_changed = _checked_fold(
      fold, len(graphs), _prefixed(fail, f"fold {k}: ")
    )
    folds.append(fold)
    changed = changed or fold_changed
  graphs_unchanged = all(
    a is b for a, b in zip(graphs, dataset.graphs, strict=True)
  )
  if (
    graphs_unchanged
    and labels is dataset.labels
    and not changed
    and isinstance(dataset.graphs, tuple)
    and isinstance(dataset.folds, tuple)
  ):
    return dataset
  return dataclasses.replace(
    dataset, graphs=tuple(graphs), labels=labels, folds=tuple(folds)
  )


def validate_prompt_sizes(
  prompt: Any, *, input_width: int, aggregate_widths: Sequence[int]
) -> None:
  """Refuses prompt counts or ranks larger than the features they act on.

  GPF-plus mixes ``num_prompts`` basis prompts of the input width; LoRAP
  builds ``num_prompts`` prompts from a rank-``rank`` basis over each
  aggregate. More basis prompts than feature columns, or a rank above the
  width, cannot add anything a smaller setting lacks. The count is checked
  against the widest feature any of the model's prompts act on (GPF-LoRAP
  shares it), the rank against LoRAP's widest aggregate.

  Args:
    prompt: The `PromptConfig` (``kind``, ``num_prompts``, ``rank``).
    input_width: The dataset's node feature width.
    aggregate_widths: Per layer, the width of the aggregate LoRAP acts on
      (`GNN.aggregate_widths`).

  Raises:
    ValueError: If a size exceeds its width; the message names both.
  """
  widths = {}
  if prompt.node_prompt == "gpf-plus":
    widths["the input features (GPF-plus)"] = input_width
  if prompt.uses_lorap:
    widths["the widest aggregate (LoRAP)"] = max(aggregate_widths)
  if not widths:
    return  # No prompt, or GPF (one prompt vector, no count or rank).
  what, width = max(widths.items(), key=lambda item: item[1])
  if prompt.num_prompts > width:
    raise ValueError(
      f"num_prompts={prompt.num_prompts} is larger than the feature width "
      f"{width} of {what} that the {prompt.kind!r} prompts act on; choose at "
      f"most {width} (--num-prompts)."
    )
  if prompt.uses_lorap and prompt.rank > max(aggregate_widths):
    width = max(aggregate_widths)
    raise ValueError(
      f"rank={prompt.rank} is larger than the feature width {width} of the "
      f"widest aggregate that LoRAP acts on; choose at most {width} (--rank)."
    )
