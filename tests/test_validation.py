"""Bad inputs at the boundary: each refusal asserts its message.

File cases corrupt copies of the real data files in tmp_path; array cases
build small datasets by hand and pass them to the public validators. The
last section checks what is handled rather than refused.
"""

import collections
import csv
import gzip
import pickle
import re
import shutil

import jax
import jraph
import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import cli, models
from lorap_jax._src import data as data_lib
from lorap_jax._src.data import files, superpixels


def _copy(data_dir, tmp_path, relative):
  """Copies the folder `relative` of the data directory into tmp_path."""
  shutil.copytree(data_dir / relative, tmp_path / relative)
  return tmp_path / relative


@pytest.fixture
def no_checksums(monkeypatch):
  """Lets edited copies of listed files through to the parsers."""
  monkeypatch.setattr(files, "_known_checksums", lambda: {})


def _edit_lines(path, edit):
  """Rewrites a text file through `edit(lines) -> lines`."""
  lines = path.read_text().splitlines()
  path.write_text("\n".join(edit(lines)) + "\n")


# --- Malformed or truncated files --------------------------------------------


def test_truncated_planetoid_pickle_fails_its_checksum(data_dir, tmp_path):
  folder = _copy(data_dir, tmp_path, "planetoid/cora")
  graph = folder / "ind.cora.graph"
  graph.write_bytes(graph.read_bytes()[:5000])
  with pytest.raises(
    data_lib.DataFileError,
    match=r"planetoid/cora/ind\.cora\.graph at .* has SHA-256 [0-9a-f]{64}, "
    r"expected [0-9a-f]{64}: the file is corrupt",
  ):
    data_lib.load_planetoid("cora", tmp_path)


def test_truncated_planetoid_pickle_is_named(data_dir, tmp_path, no_checksums):
  folder = _copy(data_dir, tmp_path, "planetoid/cora")
  graph = folder / "ind.cora.graph"
  graph.write_bytes(graph.read_bytes()[:5000])
  with pytest.raises(
    data_lib.DataFileError,
    match=r"Cannot unpickle Planetoid file .*ind\.cora\.graph: UnpicklingError"
    r".*the file ends early \(truncated\?\)",
  ):
    data_lib.load_planetoid("cora", tmp_path)


def test_nan_in_planetoid_features(data_dir, tmp_path, no_checksums):
  folder = _copy(data_dir, tmp_path, "planetoid/cora")
  with (folder / "ind.cora.allx").open("rb") as f:
    matrix = pickle.load(f, encoding="latin1").toarray()
  matrix[5, 3] = np.nan
  with (folder / "ind.cora.allx").open("wb") as f:
    pickle.dump(matrix, f, protocol=4)
  with pytest.raises(
    data_lib.DataFileError,
    match=r"Planetoid files .*planetoid/cora/ind\.cora\.\*: node features "
    r"hold 1 NaN and 0 infinite value\(s\); the first is in row 5, column 3",
  ):
    data_lib.load_planetoid("cora", tmp_path, normalize_features=False)


def test_planetoid_edge_beyond_the_node_count(data_dir, tmp_path, no_checksums):
  folder = _copy(data_dir, tmp_path, "planetoid/cora")
  with (folder / "ind.cora.graph").open("wb") as f:
    pickle.dump({0: [1, 2708]}, f, protocol=4)
  with pytest.raises(
    data_lib.DataFileError,
    match=r"ind\.cora\.graph names node ids outside 0\.\.2707 \(range found: "
    r"1\.\.2708\)",
  ):
    data_lib.load_planetoid("cora", tmp_path)


def test_truncated_gin_file(data_dir, tmp_path, no_checksums):
  folder = _copy(data_dir, tmp_path, "gin/MUTAG")
  text = (folder / "MUTAG.txt").read_text()
  (folder / "MUTAG.txt").write_text(text[: len(text) // 2])
  with pytest.raises(
    data_lib.DataFileError,
    match=r"MUTAG\.txt, line \d+: graph \d+ declares \d+ nodes but the file "
    r"ends after line \d+ \(truncated\?\)",
  ):
    data_lib.load_gin_format("MUTAG", tmp_path)


def _write_toy(root, text, num_graphs=2):
  """gin/TOY/TOY.txt, with folds alternating between graphs 0 and 1."""
  folder = root / "gin" / "TOY"
  (folder / "10fold_idx").mkdir(parents=True)
  (folder / "TOY.txt").write_text(text)
  for k in range(1, 11):
    (folder / "10fold_idx" / f"test_idx-{k}.txt").write_text(f"{k % 2}\n")
    pool = "".join(f"{i}\n" for i in range(num_graphs) if i != k % 2)
    (folder / "10fold_idx" / f"train_idx-{k}.txt").write_text(pool)


@pytest.mark.parametrize(
  ("text", "message"),
  [
    # A graph that declares no nodes.
    ("2\n1 0\n0 0\n0 1\n", r"TOY\.txt: graph 1: the graph has no nodes"),
    # A negative neighbour index.
    (
      "1\n2 0\n0 1 -1\n0 1 0\n",
      r"line 3: neighbour index -1 is outside 0\.\.1",
    ),
    # A node line that lists fewer neighbours than it declares.
    ("1\n2 0\n0 3 1\n0 1 0\n", r"line 3: the node declares 3 neighbours but"),
    # A negative neighbour count.
    ("1\n2 0\n0 -1\n0 0\n", r"line 3: the node declares -1 neighbours"),
    # A node line without its neighbour count.
    (
      "1\n2 0\n0\n0 0\n",
      r"line 3: expected a node line `tag num_neighbours neighbours\.\.\.`, "
      r"found 1 value\(s\)",
    ),
    # Continuous features on one node only: a neighbour count is wrong.
    (
      "1\n2 0\n0 1 1 0.5\n0 1 0\n",
      r"line 4: the node has 0 values after its neighbours but line 3 has 1",
    ),
  ],
)
def test_malformed_gin_file(tmp_path, text, message):
  _write_toy(tmp_path, text)
  with pytest.raises(data_lib.DataFileError, match=message):
    data_lib.load_gin_format("TOY", tmp_path)


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("0\n0\n", r"train_idx-1\.txt lists a graph index twice"),
    ("5\n", r"train_idx-1\.txt: graph index 5 is outside 0\.\.1"),
    ("one\n", r"train_idx-1\.txt, line 1: 'one' is not a number"),
  ],
)
def test_malformed_gin_fold_file(tmp_path, text, message):
  _write_toy(tmp_path, "2\n1 0\n0 0\n1 1\n0 0\n")
  (tmp_path / "gin/TOY/10fold_idx/train_idx-1.txt").write_text(text)
  with pytest.raises(data_lib.DataFileError, match=message):
    data_lib.load_gin_format("TOY", tmp_path)


# edit of one TU file (part, lines -> lines), expected message.
TU_CASES = {
  "indicator_line_missing": (
    "graph_indicator",
    lambda lines: lines[:-1],
    r"MUTAG_node_labels\.txt has 3371 lines, expected 3370 \(one per line of "
    r"MUTAG_graph_indicator\.txt\)",
  ),
  "label_line_missing": (
    "graph_labels",
    lambda lines: lines[:-1],
    r"MUTAG_graph_indicator\.txt, line \d+: graph id 188 is outside 1\.\.187 "
    r"\(one graph per line of MUTAG_graph_labels\.txt\)",
  ),
  "empty_graph": (
    "graph_labels",
    lambda lines: [*lines, "1"],
    r"MUTAG_graph_indicator\.txt: graph 189 \(line 189 of "
    r"MUTAG_graph_labels\.txt\) has no node; every graph needs at least one",
  ),
  "decreasing_graph_ids": (
    "graph_indicator",
    lambda lines: ["2", *lines[1:]],
    r"MUTAG_graph_indicator\.txt, line 2: graph id 1 follows 2; ids must not "
    r"decrease",
  ),
  "negative_node_id": (
    "A",
    lambda lines: ["-4, 2", *lines[1:]],
    r"MUTAG_A\.txt, line 1: node id -4 is outside 1\.\.3371",
  ),
  "node_id_beyond_count": (
    "A",
    lambda lines: [*lines[:9], "2, 3372", *lines[10:]],
    r"MUTAG_A\.txt, line 10: node id 3372 is outside 1\.\.3371",
  ),
  "not_a_number": (
    "A",
    lambda lines: [*lines[:2], "2, x", *lines[3:]],
    r"MUTAG_A\.txt, line 3: 'x' is not a number",
  ),
  "edge_between_graphs": (
    "A",
    lambda lines: ["1, 3371", *lines[1:]],
    r"MUTAG_A\.txt, edge 1: nodes 1 and 3371 are in different graphs",
  ),
}


@pytest.mark.parametrize("case", list(TU_CASES))
def test_malformed_tu_files(data_dir, tmp_path, no_checksums, case):
  part, edit, message = TU_CASES[case]
  folder = _copy(data_dir, tmp_path, "tu/MUTAG")
  _edit_lines(folder / f"MUTAG_{part}.txt", edit)
  with pytest.raises(data_lib.DataFileError, match=message):
    data_lib.load_tu("MUTAG", tmp_path)


def _idx(magic, shape):
  """Bytes of an IDX file: magic, the dimensions, then zero uint8 data."""
  header = np.array([magic, *shape], dtype=">u4").tobytes()
  return header + bytes(int(np.prod(shape)))


# name: (the images file, how many labels, the message)
MNIST_CASES = {
  "not_gzip": (
    b"plain bytes",
    3,
    r"Cannot read .*t10k-images-idx3-ubyte\.gz",
  ),
  "short_header": (
    gzip.compress(b"\x00\x00\x08\x03"),
    3,
    r"t10k-images-idx3-ubyte\.gz is too short for an IDX header",
  ),
  "labels_as_images": (
    gzip.compress(_idx(2049, [3, 28, 28])),
    3,
    r"t10k-images-idx3-ubyte\.gz has magic number 2049, expected 2051",
  ),
  "truncated": (
    gzip.compress(_idx(2051, [3, 28, 28])[:-5]),
    3,
    r"holds 2363 bytes after decompression, expected 2368 .*truncated",
  ),
  "not_28_by_28": (
    gzip.compress(_idx(2051, [3, 28, 27])),
    3,
    r"images of shape \(28, 27\), not MNIST's 28 x 28",
  ),
  "fewer_labels": (
    gzip.compress(_idx(2051, [3, 28, 28])),
    2,
    r"holds 3 images but .*t10k-labels-idx1-ubyte\.gz holds 2 labels",
  ),
}


@pytest.mark.parametrize("case", list(MNIST_CASES))
def test_malformed_mnist_files(tmp_path, no_checksums, case):
  images, num_labels, message = MNIST_CASES[case]
  raw = tmp_path / "mnist" / "raw"
  raw.mkdir(parents=True)
  (raw / "t10k-images-idx3-ubyte.gz").write_bytes(images)
  labels = _idx(2049, [num_labels])
  (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
  with pytest.raises(data_lib.DataFileError, match=message):
    superpixels.read_mnist(tmp_path, "test")


def _rewrite_aqsol_csv(path, edit):
  """Rewrites the AqSol CSV through `edit(header, rows)` on parsed cells."""
  with path.open(newline="", encoding="utf-8") as f:
    header, *rows = list(csv.reader(f))
  edit(header, rows)
  with path.open("w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([header, *rows])


def _set_first_row(column, value):
  def edit(header, rows):
    rows[0][header.index(column)] = value

  return edit


def _rename_column(old, new):
  def edit(header, rows):
    header[header.index(old)] = new

  return edit


# Each case edits one file of a copy of aqsol/ whose training rows are cut
# to the first two (row 0 among them), so a good file costs little.
AQSOL_CASES = {
  "csv_without_targets": (
    "csv",
    _rename_column("Solubility", "LogS"),
    r"curated-solubility-dataset\.csv has no column\(s\) \['Solubility'\]",
  ),
  "csv_target_not_a_number": (
    "csv",
    _set_first_row("Solubility", "insoluble"),
    r"curated-solubility-dataset\.csv, line 2: could not convert .*insoluble",
  ),
  "unknown_element": (
    "csv",
    _set_first_row("SMILES", "[Og]"),
    r"row 0: 'Og' has no entry in the AqSol atom or bond dictionary",
  ),
  "unparsable_smiles": (
    "csv",
    _set_first_row("SMILES", "C1CC"),
    r"row 0: RDKit cannot parse the SMILES 'C1CC'",
  ),
  "row_not_an_integer": (
    "rows",
    "x\n",
    r"train\.txt: invalid literal for int\(\) .*'x'",
  ),
  "row_beyond_the_csv": (
    "rows",
    "0\n9982\n",
    r"train\.txt: row 9982 is outside the 9982 rows of curated",
  ),
  "val_not_a_list": (
    "val",
    {"molecules": 1},
    r"val\.pickle should hold a list of molecules",
  ),
  "val_entry_not_a_molecule": (
    "val",
    [(1, 2)],
    r"val\.pickle, molecule 0: expected \(atom types, bond types, edge_index",
  ),
  "val_self_loops": (
    "val",
    [([0, 1], [1, 1], [[0, 1], [0, 1]], -1.0)],
    r"AqSol val molecule 0: the edges must list every bond once in each "
    r"direction, without self-loops",
  ),
  "val_atom_type_outside_the_dictionary": (
    "val",
    [([0, 999], [1, 1], [[0, 1], [1, 0]], -1.0)],
    r"An AqSol atom type is outside 0\.\.64",
  ),
}


@pytest.mark.parametrize("case", list(AQSOL_CASES))
def test_malformed_aqsol_files(data_dir, tmp_path, no_checksums, case):
  pytest.importorskip("rdkit")
  part, change, message = AQSOL_CASES[case]
  folder = _copy(data_dir, tmp_path, "aqsol")
  rows = folder / "derived_split_rows" / "train.txt"
  rows.write_text("0\n15\n")
  if part == "csv":
    _rewrite_aqsol_csv(folder / "curated-solubility-dataset.csv", change)
  elif part == "rows":
    rows.write_text(change)
  else:
    (folder / "asqol_graph_raw" / "val.pickle").write_bytes(
      pickle.dumps(change)
    )
  with pytest.raises(data_lib.DataFileError, match=message):
    data_lib.load_dataset("aqsol", tmp_path)


# --- Datasets built by hand ---------------------------------------------------


def _graph(nodes, senders, receivers, n_node=None, n_edge=None):
  nodes = np.asarray(nodes)
  return jraph.GraphsTuple(
    nodes=nodes,
    edges=None,
    globals=None,
    senders=np.asarray(senders),
    receivers=np.asarray(receivers),
    n_node=np.array([len(nodes) if n_node is None else n_node]),
    n_edge=np.array([len(senders) if n_edge is None else n_edge]),
  )


def _node_dataset(**changes):
  """A valid 4-node path graph with one node per split, then `changes`."""
  fields = dict(
    graph=_graph(
      np.eye(4, dtype=np.float32), [0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]
    ),
    labels=np.array([0, 1, 0, 1]),
    train_mask=np.array([True, True, False, False]),
    val_mask=np.array([False, False, True, False]),
    test_mask=np.array([False, False, False, True]),
    num_classes=2,
  )
  fields.update(changes)
  return data_lib.NodeDataset(name="toy", **fields)


NODE_CASES = {
  "float_edge_ids": (
    dict(graph=_graph(np.eye(3), [0.0, 1.0], [1, 0])),
    r"senders must hold integer node ids, found dtype float64",
  ),
  "unpaired_edges": (
    dict(graph=_graph(np.eye(3), [0, 1, 2], [1, 0], n_edge=3)),
    r"senders and receivers must pair up, found 3 senders and 2 receivers",
  ),
  "edge_ids_not_1d": (
    dict(graph=_graph(np.eye(3), [[0, 1]], [[1, 0]], n_edge=1)),
    r"senders must be 1-D \[n_edges\], found shape \(1, 2\)",
  ),
  "negative_edge_id": (
    dict(graph=_graph(np.eye(4), [0, -1, 2], [1, 0, 3])),
    r"Dataset 'toy': senders\[1\] = -1 is negative \(1 bad id\(s\)",
  ),
  "edge_id_beyond_nodes": (
    dict(graph=_graph(np.eye(4), [0, 1, 2, 3], [1, 0, 4, 5])),
    r"receivers\[2\] = 4 is out of range: the graph has 4 node\(s\), ids "
    r"0\.\.3 \(2 bad id\(s\) in receivers\)",
  ),
  "nan_features": (
    dict(
      graph=_graph(
        np.array([[0, 1], [np.nan, 2], [np.nan, 3], [1, 1]], np.float32), [], []
      )
    ),
    r"node features hold 2 NaN and 0 infinite value\(s\); the first is in "
    r"row 1, column 0: nan",
  ),
  "infinite_features": (
    dict(graph=_graph([[0.0], [1], [2], [-np.inf]], [], [])),
    r"node features hold 0 NaN and 1 infinite value\(s\); the first is in "
    r"row 3, column 0: -inf",
  ),
  "float64_overflow": (
    dict(graph=_graph([[0.0], [1e300], [2], [3]], [], [])),
    r"node features hold 1 value\(s\) beyond the float32 range; the first "
    r"is in row 1, column 0: 1e\+300",
  ),
  "features_not_2d": (
    dict(graph=_graph(np.ones(4), [], [])),
    r"node features must be 2-D \[n_nodes, features\], found shape \(4,\)",
  ),
  "features_not_numbers": (
    dict(graph=_graph(np.array([["a"], ["b"], ["c"], ["d"]]), [], [])),
    r"node features must be numbers, found dtype <U1",
  ),
  "features_without_columns": (
    dict(graph=_graph(np.zeros((4, 0)), [], [])),
    r"node features have no columns \(width 0\)",
  ),
  "rows_disagree_with_n_node": (
    dict(graph=_graph(np.eye(4), [], [], n_node=5)),
    r"n_node says 5 nodes but the features have 4 rows",
  ),
  "no_nodes": (
    dict(graph=_graph(np.zeros((0, 3)), [], [])),
    r"the graph has no nodes; every graph needs at least one",
  ),
  "label_out_of_range": (
    dict(labels=np.array([0, 1, 5, 1])),
    r"labels\[2\] = 5 is outside 0\.\.1 \(num_classes=2; 1 bad label\(s\)\)",
  ),
  "negative_label": (
    dict(labels=np.array([-1, 1, 0, 1])),
    r"labels\[0\] = -1 is outside 0\.\.1",
  ),
  "float_labels": (
    dict(labels=np.array([0.0, 1, 0, 1])),
    r"labels must be integers, found dtype float64",
  ),
  "labels_wrong_length": (
    dict(labels=np.array([0, 1, 0])),
    r"labels must have shape \(4,\), one per node, found \(3,\)",
  ),
  "no_classes": (
    dict(num_classes=0),
    r"num_classes=0 must be an integer >= 1",
  ),
  "overlapping_masks": (
    dict(test_mask=np.array([True, False, False, True])),
    r"train_mask and test_mask share 1 node\(s\), e.g. node 0; they must be "
    r"disjoint",
  ),
  "integer_mask": (
    dict(val_mask=np.array([0, 0, 1, 0])),
    r"val_mask must be a bool array, found dtype int64",
  ),
  "empty_mask": (
    dict(val_mask=np.zeros(4, dtype=bool)),
    r"val_mask selects no node",
  ),
  "short_mask": (
    dict(train_mask=np.array([True, False])),
    r"train_mask must have shape \(4,\), one entry per node, found \(2,\)",
  ),
}


@pytest.mark.parametrize("case", list(NODE_CASES))
def test_bad_node_dataset(case):
  changes, message = NODE_CASES[case]
  with pytest.raises(data_lib.DatasetError, match=message):
    lorap_jax.validate_node_dataset(_node_dataset(**changes))


def _graph_dataset(graphs=None, **changes):
  """Three small valid graphs in one fold, then `changes`."""
  if graphs is None:
    graphs = [
      _graph(np.eye(3, dtype=np.float32), [0, 1], [1, 0]),
      _graph(np.eye(3, dtype=np.float32)[:2], [], []),
      _graph(np.eye(3, dtype=np.float32), [1, 2], [2, 1]),
    ]
  fields = dict(
    graphs=tuple(graphs),
    labels=np.array([0, 1, 0]),
    num_classes=2,
    folds=(data_lib.Fold(np.array([0]), np.array([1]), np.array([2])),),
  )
  fields.update(changes)
  return data_lib.GraphDataset(name="toys", **fields)


def _fold(train, val, test):
  return (data_lib.Fold(np.array(train), np.array(val), np.array(test)),)


GRAPH_CASES = {
  "empty_graph": (
    dict(
      graphs=[_graph(np.eye(2), [0], [1]), _graph(np.zeros((0, 2)), [], [])]
    ),
    r"Dataset 'toys': graph 1: the graph has no nodes",
  ),
  "no_graphs": (dict(graphs=[]), r"the dataset holds no graphs"),
  "feature_widths_differ": (
    dict(graphs=[_graph(np.eye(3), [], []), _graph(np.ones((2, 2)), [], [])]),
    r"graph 1: node features have 2 columns but graph 0's have 3",
  ),
  "inf_in_second_graph": (
    dict(graphs=[_graph(np.eye(2), [], []), _graph([[0, np.inf]], [], [])]),
    r"0 NaN and 1 infinite value\(s\); the first is in graph 1, row 0, "
    r"column 1",
  ),
  "edge_id_beyond_its_graph": (
    dict(
      graphs=[
        _graph(np.eye(3), [0, 1], [1, 0]),
        _graph(np.eye(3)[:1], [0], [1]),
      ]
    ),
    r"graph 1: receivers\[0\] = 1 is out of range: the graph has 1 node\(s\)",
  ),
  "two_graphs_in_one": (
    dict(graphs=[_graph(np.eye(3), [], [], n_node=[2, 1])]),
    r"graph 0: n_node must hold one integer \(one graph per GraphsTuple\), "
    r"found \[2, 1\]",
  ),
  "graph_label_out_of_range": (
    dict(labels=np.array([0, 2, 1])),
    r"labels\[1\] = 2 is outside 0\.\.1",
  ),
  "fold_index_out_of_range": (
    dict(folds=_fold([0], [1], [7])),
    r"fold 0: test\[0\] = 7 is outside 0\.\.2 \(3 graphs\)",
  ),
  "fold_parts_overlap": (
    dict(folds=_fold([0, 2], [1], [2])),
    r"fold 0: train and test share 1 graph\(s\), e.g. graph 2",
  ),
  "fold_repeats_a_graph": (
    dict(folds=_fold([0, 0], [1], [2])),
    r"fold 0: train lists graph 0 twice",
  ),
  "fold_indices_not_integers": (
    dict(folds=_fold([0], [1.0], [2])),
    r"fold 0: val must be 1-D integer graph indices, found dtype float64",
  ),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_bad_graph_dataset(case):
  changes, message = GRAPH_CASES[case]
  with pytest.raises(data_lib.DatasetError, match=message):
    lorap_jax.validate_graph_dataset(_graph_dataset(**changes))


# --- Settings that do not fit ------------------------------------------------


@pytest.mark.parametrize(
  ("bits", "message"),
  [
    (4.5, r"bits=\[4\.5\] must be integers in 1\.\.16"),
    ("four", r"bits='four' must be integers in 1\.\.16"),
    ("4", r"bits='4' must be integers in 1\.\.16"),
    (float("nan"), r"bits=\[nan\] must be integers in 1\.\.16"),
  ],
)
def test_bits_that_are_not_integers(bits, message):
  with pytest.raises(ValueError, match=message):
    lorap_jax.check_bits(bits)


def test_cli_refuses_fractional_bits(tmp_path, capsys):
  code = cli.main(
    ["train", "--dataset=cora", f"--workdir={tmp_path}", "--set=quant.bits=4.5"]
  )
  assert code == 2
  assert re.search(
    r"lorap: error: config field 'quant.bits' cannot be set to 4\.5: .*"
    r"cannot be casted to type <class 'int'>",
    capsys.readouterr().err,
  )
  with pytest.raises(SystemExit):
    cli.main(["train", "--dataset=cora", "--workdir=unused", "--bits=4.5"])
  assert "argument --bits: invalid int value: '4.5'" in capsys.readouterr().err


def _prompt(kind, num_prompts=10, rank=4):
  return lorap_jax.PromptConfig(kind=kind, num_prompts=num_prompts, rank=rank)


@pytest.mark.parametrize(
  ("prompt", "message"),
  [
    (
      _prompt("lorap", rank=65),
      r"rank=65 is larger than the feature width 64 of the widest aggregate "
      r"that LoRAP acts on; choose at most 64 \(--rank\)",
    ),
    (
      _prompt("lorap", num_prompts=100),
      r"num_prompts=100 is larger than the feature width 64 of the widest "
      r"aggregate \(LoRAP\) that the 'lorap' prompts act on",
    ),
    (
      _prompt("gpf-plus", num_prompts=10),
      r"num_prompts=10 is larger than the feature width 7 of the input "
      r"features \(GPF-plus\) that the 'gpf-plus' prompts act on; choose at "
      r"most 7 \(--num-prompts\)",
    ),
  ],
)
def test_prompt_larger_than_the_features(prompt, message):
  with pytest.raises(ValueError, match=message):
    data_lib.validate_prompt_sizes(
      prompt, input_width=7, aggregate_widths=(64, 2)
    )


def test_prompt_sizes_that_fit():
  # GPF-LoRAP shares k: it may exceed the narrow input if an aggregate is
  # wider, as in the README's PROTEINS example (3 features, k = 16).
  data_lib.validate_prompt_sizes(
    _prompt("gpf-lorap", num_prompts=16, rank=8),
    input_width=3,
    aggregate_widths=(3, 64, 64),
  )
  data_lib.validate_prompt_sizes(
    _prompt("gpf", num_prompts=99), input_width=1, aggregate_widths=(1,)
  )


def test_train_refuses_a_rank_above_the_feature_width(data_dir, tmp_path):
  config = lorap_jax.get_config("cora")
  config.data_dir = str(data_dir)
  config.model.hidden = 8
  config.prompt.num_prompts, config.prompt.rank = 4, 9
  with pytest.raises(
    ValueError, match=r"rank=9 is larger than the feature width 8"
  ):
    lorap_jax.train_and_evaluate(config, tmp_path)


def test_aggregate_widths():
  def widths(architecture, task):
    config = models.ModelConfig(
      architecture=architecture,
      task=task,
      num_classes=3,
      hidden=16,
      num_layers=3,
      heads=4,
    )
    return lorap_jax.GNN(model=config).aggregate_widths(100)

  assert widths("gcn", "node") == (16, 16, 3)
  assert widths("gat", "node") == (16, 16, 3)
  assert widths("gin", "graph") == (100, 16, 16)


# --- Handled, not refused -----------------------------------------------------


def test_integer_features_are_cast():
  dataset = _node_dataset(graph=_graph(np.eye(4, dtype=np.int64), [], []))
  checked = lorap_jax.validate_node_dataset(dataset)
  assert checked.graph.nodes.dtype == np.float32
  np.testing.assert_array_equal(checked.graph.nodes, np.eye(4))
  assert checked.labels.dtype == np.int32
  bools = _graph_dataset(graphs=[_graph(np.eye(2, dtype=bool), [0], [1])] * 3)
  checked = lorap_jax.validate_graph_dataset(bools)
  assert all(g.nodes.dtype == np.float32 for g in checked.graphs)


def test_duplicate_edges_and_self_loops_are_canonicalised():
  # A self-loop on 2, edge 0-1 twice, and 1 -> 3 in one direction only.
  graph = _graph(np.eye(4), [0, 0, 2, 1, 1], [1, 1, 2, 0, 3])
  checked = lorap_jax.validate_node_dataset(_node_dataset(graph=graph)).graph
  pairs = list(
    zip(checked.senders.tolist(), checked.receivers.tolist(), strict=True)
  )
  assert pairs == [(1, 0), (0, 1), (3, 1), (1, 3)]  # by (receiver, sender)
  assert checked.senders.dtype == checked.receivers.dtype == np.int32
  np.testing.assert_array_equal(checked.n_edge, [4])
  # The loaders' helper agrees, so hand-built and loaded data look alike.
  senders, receivers = data_lib.canonical_edges(
    [0, 0, 2, 1, 1], [1, 1, 2, 0, 3], 4
  )
  np.testing.assert_array_equal(senders, checked.senders)
  np.testing.assert_array_equal(receivers, checked.receivers)


def test_gin_file_with_self_loops_and_duplicates(tmp_path):
  # Graph 0: a self-loop on node 0 and the edge 0-1 listed three times.
  _write_toy(tmp_path, "2\n2 0\n0 3 0 1 1\n0 1 0\n1 1\n0 0\n")
  first = lorap_jax.load_gin_format("TOY", tmp_path).graphs[0]
  np.testing.assert_array_equal(first.senders, [1, 0])
  np.testing.assert_array_equal(first.receivers, [0, 1])


def test_valid_datasets_pass_unchanged(data_dir):
  cora = lorap_jax.load_dataset("cora", data_dir)
  assert lorap_jax.validate_node_dataset(cora) is cora
  mutag = lorap_jax.load_dataset("tu-mutag", data_dir)
  assert lorap_jax.validate_graph_dataset(mutag) is mutag


def test_edgeless_graphs_and_isolated_nodes_batch_and_run(tmp_path):
  # Graph 1 has no edges; node 2 of graph 0 is isolated.
  _write_toy(tmp_path, "2\n3 0\n0 1 1\n0 1 0\n1 0\n2 1\n0 0\n0 0\n")
  dataset = lorap_jax.load_gin_format("TOY", tmp_path)
  assert [int(g.n_edge[0]) for g in dataset.graphs] == [2, 0]
  assert dataset.graphs[1].senders.shape == (0,)
  budgets = lorap_jax.make_budgets(dataset.graphs, batch_size=2)
  (batch,) = lorap_jax.iterate_batches(
    dataset, [0, 1], 2, budgets, shuffle=False
  )
  np.testing.assert_array_equal(batch.graph.n_node[:2], [3, 2])
  np.testing.assert_array_equal(batch.graph.n_edge[:2], [2, 0])
  model = lorap_jax.GNN(
    model=lorap_jax.ModelConfig(
      architecture="gin", task="graph", num_classes=2, hidden=8, num_layers=2
    ),
    prompt=_prompt("lorap", num_prompts=2, rank=2),
  )
  graph = jax.tree.map(jax.numpy.asarray, batch.graph)
  # One compiled program instead of many eager ops.
  logits = jax.jit(lambda g: model.apply(model.init(jax.random.key(0), g), g))(
    graph
  )
  assert logits.shape == (budgets[0].n_graph, 2)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_hand_built_graph_dataset_is_normalised():
  dataset = _graph_dataset(
    graphs=[
      _graph(np.eye(2), [0, 0], [1, 1]),  # duplicate, one direction
      _graph(np.eye(2), [], []),
      _graph(np.eye(2), [1], [1]),  # a self-loop only
    ],
    labels=[0, 1, 1],
    folds=[([0], np.array([1]), (2,))],  # plain sequences, not Folds
  )
  checked = lorap_jax.validate_graph_dataset(dataset)
  assert isinstance(checked.graphs, tuple) and isinstance(checked.folds, tuple)
  assert [int(g.n_edge[0]) for g in checked.graphs] == [2, 0, 0]
  assert checked.labels.dtype == np.int32
  assert checked.folds[0].test.dtype == np.int32


def test_missing_file_mentions_the_download_option(tmp_path):
  with pytest.raises(
    FileNotFoundError,
    match=r"ind\.cora\.x is missing.*fetched from their public source with "
    r"`lorap train --download` or `lorap_jax\.fetch_dataset",
  ):
    lorap_jax.load_dataset("cora", tmp_path)
  with pytest.raises(FileNotFoundError, match=r"MUTAG\.txt is missing") as info:
    lorap_jax.load_dataset("mutag", tmp_path)
  assert "--download" not in str(info.value)  # GIN sets have no source


def test_defaultdict_adjacency_is_accepted(data_dir, tmp_path, no_checksums):
  # The Planetoid graph pickle is a defaultdict; the self-loop and the
  # duplicate are handled.
  folder = _copy(data_dir, tmp_path, "planetoid/cora")
  adjacency = collections.defaultdict(list)
  with (folder / "ind.cora.graph").open("rb") as f:
    adjacency.update(pickle.load(f, encoding="latin1"))
  adjacency[0] = [*adjacency[0], 0, adjacency[0][0]]
  with (folder / "ind.cora.graph").open("wb") as f:
    pickle.dump(adjacency, f, protocol=4)
  graph = lorap_jax.load_planetoid("cora", tmp_path).graph
  assert len(graph.senders) == 10556
