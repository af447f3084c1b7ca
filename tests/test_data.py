"""Tests of dataset loading and batching against the data README's counts."""

import os
import pathlib
import re
import shutil

import jraph
import numpy as np
import pytest

from lorap_jax._src import data
from lorap_jax._src.data import files

# name: (nodes, directed edges, features, classes, train, class counts of
# the labelled nodes, nodes without a test row). Data README, section 1.
PLANETOID_COUNTS = {
  "cora": (2708, 10556, 1433, 7, 140, [351, 217, 418, 818, 426, 298, 180], 0),
  "citeseer": (3327, 9104, 3703, 6, 120, [249, 590, 668, 701, 596, 508], 15),
  "pubmed": (19717, 88648, 500, 3, 60, [4103, 7739, 7875], 0),
}

# name: (graphs, nodes, directed adjacency entries, label counts after
# remapping, fold-1 train_idx / test_idx sizes, feature dimension).
# Data README, section 3; the IMDB dimensions are max degree + 1.
GIN_COUNTS = {
  "mutag": (188, 3371, 7442, [63, 125], 170, 18, 7),
  "proteins": (1113, 43471, 162088, [663, 450], 1002, 111, 3),
  "nci1": (4110, 122747, 265506, [2053, 2057], 3699, 411, 37),
  "imdb-binary": (1000, 19773, 193062, [500, 500], 900, 100, 136),
  "imdb-multi": (1500, 19502, 197806, [500, 500, 500], 1350, 150, 89),
  "ptc": (344, 8792, 17862, [192, 152], 310, 34, 19),
  "reddit-binary": (2000, 859254, 1991016, [1000, 1000], 1800, 200, 1),
}
# Sets whose ten DGCNN test folds cover every graph (README section 3).
GIN_TEST_FOLDS_PARTITION = (
  "nci1",
  "imdb-binary",
  "imdb-multi",
  "reddit-binary",
)

# name: (graphs, nodes, A lines, label counts, distinct node labels).
# Data README, section 2.
TU_COUNTS = {
  "tu-mutag": (188, 3371, 7442, [63, 125], 7),
  "tu-proteins": (1113, 43471, 162088, [663, 450], 3),
  "tu-nci1": (4110, 122747, 265506, [2053, 2057], 37),
}


@pytest.fixture(scope="module")
def load(data_dir):
  """Returns `load_dataset` memoised for this module (REDDIT-BINARY once)."""
  cache = {}

  def load_cached(name, **options):
    key = (name, tuple(sorted(options.items())))
    if key not in cache:
      cache[key] = data.load_dataset(name, data_dir, **options)
    return cache[key]

  return load_cached


def _batch_all(graphs):
  """Batches graphs; jraph.batch_np widens the edge indices to int64."""
  batched = jraph.batch_np(graphs)
  return batched._replace(
    senders=batched.senders.astype(np.int32),
    receivers=batched.receivers.astype(np.int32),
  )


def _assert_canonical_edges(senders, receivers, num_nodes):
  """Both directions, no self-loops or duplicates, sorted by (recv, send)."""
  assert senders.dtype == receivers.dtype == np.int32
  assert senders.min(initial=0) >= 0
  assert senders.max(initial=0) < num_nodes
  assert receivers.max(initial=0) < num_nodes
  assert not np.any(senders == receivers)
  keys = receivers.astype(np.int64) * num_nodes + senders
  assert np.all(np.diff(keys) > 0)  # sorted and unique
  reverse = np.sort(senders.astype(np.int64) * num_nodes + receivers)
  np.testing.assert_array_equal(reverse, keys)


def _copy_tree(source: pathlib.Path, target: pathlib.Path) -> None:
  """Copies files without their read-only modes, so tests can change them."""
  for path in source.rglob("*"):
    if path.is_file():
      destination = target / path.relative_to(source)
      destination.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(path, destination)


# --- Planetoid ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PLANETOID_COUNTS))
def test_planetoid_counts(load, name):
  nodes, edges, features, classes, train, class_counts, unlabelled = (
    PLANETOID_COUNTS[name]
  )
  dataset = load(name)
  graph = dataset.graph
  assert isinstance(dataset, data.NodeDataset)
  assert graph.nodes.shape == (nodes, features)
  assert graph.nodes.dtype == np.float32
  assert graph.edges is None and graph.globals is None
  assert len(graph.senders) == edges
  np.testing.assert_array_equal(graph.n_node, [nodes])
  np.testing.assert_array_equal(graph.n_edge, [edges])
  assert graph.n_node.dtype == graph.n_edge.dtype == np.int32
  assert dataset.num_features == features
  assert dataset.num_classes == classes
  assert dataset.labels.dtype == np.int32
  assert dataset.labels.shape == (nodes,)
  masks = (dataset.train_mask, dataset.val_mask, dataset.test_mask)
  assert [int(m.sum()) for m in masks] == [train, 500, 1000]
  assert all(m.dtype == bool for m in masks)
  assert np.all(np.sum(masks, axis=0) <= 1)  # disjoint
  np.testing.assert_array_equal(
    np.flatnonzero(dataset.train_mask)[-1], train - 1
  )
  # CiteSeer's test-range ids without a test row have no features or label,
  # and belong to no split.
  has_row = graph.nodes.sum(axis=1) > 0
  assert int((~has_row).sum()) == unlabelled
  assert not np.any(np.any(masks, axis=0) & ~has_row)
  np.testing.assert_array_equal(
    np.bincount(dataset.labels[has_row], minlength=classes), class_counts
  )


@pytest.mark.parametrize("name", sorted(PLANETOID_COUNTS))
def test_planetoid_edges_are_canonical(load, name):
  graph = load(name).graph
  _assert_canonical_edges(graph.senders, graph.receivers, graph.nodes.shape[0])


@pytest.mark.parametrize("name", sorted(PLANETOID_COUNTS))
def test_planetoid_features_are_row_normalised(load, name):
  row_sums = load(name).graph.nodes.sum(axis=1)
  assert np.all(np.isclose(row_sums, 1.0, atol=1e-5) | (row_sums == 0))


def test_planetoid_raw_features(data_dir):
  dataset = data.load_planetoid("Cora", data_dir, normalize_features=False)
  assert set(np.unique(dataset.graph.nodes)) == {0.0, 1.0}  # bag of words
  assert dataset.name == "cora"


# --- GIN format --------------------------------------------------------------


@pytest.mark.parametrize("name", list(GIN_COUNTS))
def test_gin_counts(load, name):
  num_graphs, nodes, entries, label_counts, _, _, features = GIN_COUNTS[name]
  dataset = load(name)
  assert isinstance(dataset, data.GraphDataset)
  assert len(dataset.graphs) == num_graphs
  assert sum(int(g.n_node[0]) for g in dataset.graphs) == nodes
  assert sum(len(g.senders) for g in dataset.graphs) == entries
  assert dataset.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(dataset.labels), label_counts)
  assert dataset.num_classes == len(label_counts)
  assert dataset.num_features == features
  for graph in dataset.graphs[:5]:
    assert graph.nodes.dtype == np.float32
    assert graph.nodes.shape == (int(graph.n_node[0]), features)
    assert graph.edges is None and graph.globals is None


@pytest.mark.parametrize("name", list(GIN_COUNTS))
def test_gin_edges_are_canonical(load, name):
  graphs = load(name).graphs
  for graph in graphs[:50]:  # local ids, graph by graph
    _assert_canonical_edges(graph.senders, graph.receivers, graph.n_node[0])
  batched = _batch_all(graphs)
  _assert_canonical_edges(
    batched.senders, batched.receivers, int(batched.n_node.sum())
  )


@pytest.mark.parametrize("name", list(GIN_COUNTS))
def test_gin_folds(load, name):
  num_graphs, _, _, _, fold1_train_idx, fold1_test, _ = GIN_COUNTS[name]
  dataset = load(name)
  assert len(dataset.folds) == data.NUM_FOLDS
  first = dataset.folds[0]
  assert len(first.test) == fold1_test
  # train_idx-1 is split into train and the validation fold (test_idx-10).
  assert len(first.train) + len(first.val) == fold1_train_idx
  np.testing.assert_array_equal(first.val, dataset.folds[-1].test)
  for fold in dataset.folds:
    parts = np.concatenate(fold)
    assert parts.dtype == np.int32
    assert len(np.unique(parts)) == len(parts)  # disjoint
    assert parts.min() >= 0 and parts.max() < num_graphs
  if name in GIN_TEST_FOLDS_PARTITION:
    tests = np.sort(np.concatenate([fold.test for fold in dataset.folds]))
    np.testing.assert_array_equal(tests, np.arange(num_graphs))


@pytest.mark.parametrize("name", ["mutag", "proteins", "nci1", "ptc"])
def test_gin_tag_features_are_one_hot(load, name):
  nodes = np.concatenate([g.nodes for g in load(name).graphs])
  np.testing.assert_array_equal(nodes.sum(axis=1), 1.0)
  assert np.all(nodes.sum(axis=0) > 0)  # every tag value is used


def test_imdb_binary_has_one_hot_degree_features(load):
  for graph in load("imdb-binary").graphs[:20]:
    degrees = np.bincount(graph.receivers, minlength=graph.n_node[0])
    np.testing.assert_array_equal(graph.nodes.argmax(axis=1), degrees)
    np.testing.assert_array_equal(graph.nodes.sum(axis=1), 1.0)


def test_reddit_binary_has_standardised_degree_feature(load):
  graphs = load("reddit-binary").graphs
  features = np.concatenate([g.nodes[:, 0] for g in graphs]).astype(np.float64)
  assert features.mean() == pytest.approx(0.0, abs=1e-5)
  assert features.std(ddof=1) == pytest.approx(1.0, abs=1e-5)
  degrees = np.bincount(graphs[0].receivers, minlength=graphs[0].n_node[0])
  assert np.corrcoef(degrees, graphs[0].nodes[:, 0])[0, 1] == pytest.approx(1)


def test_node_features_option_can_be_forced(data_dir):
  by_degree = data.load_gin_format("MUTAG", data_dir, node_features="degree")
  assert by_degree.num_features == 5  # MUTAG's maximum degree is 4
  by_tags = data.load_gin_format("imdbbinary", data_dir, node_features="tags")
  assert by_tags.num_features == 1  # a single tag value


# --- TU format ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(TU_COUNTS))
def test_tu_counts(load, name):
  num_graphs, nodes, a_lines, label_counts, tag_values = TU_COUNTS[name]
  dataset = load(name)
  assert len(dataset.graphs) == num_graphs
  batched = _batch_all(dataset.graphs)
  assert int(batched.n_node.sum()) == nodes
  # A lists both directions of every edge and no self-loops or duplicates.
  assert len(batched.senders) == a_lines
  _assert_canonical_edges(batched.senders, batched.receivers, nodes)
  np.testing.assert_array_equal(np.bincount(dataset.labels), label_counts)
  assert dataset.num_features == tag_values


@pytest.mark.parametrize("name", list(TU_COUNTS))
def test_tu_folds_are_stratified(load, name):
  dataset = load(name)
  num_graphs = len(dataset.graphs)
  tests = [fold.test for fold in dataset.folds]
  np.testing.assert_array_equal(
    np.sort(np.concatenate(tests)), np.arange(num_graphs)
  )
  class_counts = np.bincount(dataset.labels)
  for k, fold in enumerate(dataset.folds):
    np.testing.assert_array_equal(fold.val, tests[k - 1])
    everything = np.sort(np.concatenate(fold))
    np.testing.assert_array_equal(everything, np.arange(num_graphs))
    assert abs(len(fold.test) - num_graphs / data.NUM_FOLDS) < 1
    per_class = np.bincount(
      dataset.labels[fold.test], minlength=len(class_counts)
    )
    assert np.all(np.abs(per_class - class_counts / data.NUM_FOLDS) < 1)


def test_tu_folds_follow_the_seed(data_dir):
  first = data.load_tu("MUTAG", data_dir, seed=1)
  again = data.load_tu("tu-mutag", data_dir, seed=1)
  other = data.load_tu("mutag", data_dir, seed=2)
  np.testing.assert_array_equal(first.folds[0].test, again.folds[0].test)
  assert not np.array_equal(first.folds[0].test, other.folds[0].test)


@pytest.mark.parametrize("name", ["proteins", "nci1"])
def test_gin_and_tu_files_hold_the_same_graphs(load, name):
  gin, tu = load(name), load(f"tu-{name}")
  np.testing.assert_array_equal(gin.labels, tu.labels)
  for gin_graph, tu_graph in zip(gin.graphs, tu.graphs, strict=True):
    np.testing.assert_array_equal(gin_graph.n_node, tu_graph.n_node)
    np.testing.assert_array_equal(gin_graph.senders, tu_graph.senders)
    np.testing.assert_array_equal(gin_graph.receivers, tu_graph.receivers)


# --- Batching ----------------------------------------------------------------


def test_make_budgets(load):
  graphs = load("proteins").graphs
  budgets = data.make_budgets(graphs, batch_size=32)
  assert 1 <= len(budgets) <= 3
  assert list(budgets) == sorted(budgets)
  for budget in budgets:
    assert budget.n_graph == 33
    assert budget.n_node % 64 == 0 and budget.n_edge % 64 == 0
  largest_first = sorted(graphs, key=lambda g: -int(g.n_node[0]))[:32]
  assert sum(int(g.n_node[0]) for g in largest_first) < budgets[-1].n_node
  most_edges = sorted(int(g.n_edge[0]) for g in graphs)[-32:]
  assert sum(most_edges) <= budgets[-1].n_edge


def test_budget_ladder_pads_each_batch_by_at_most_its_growth(load):
  """With `growth`, a batch's budget is within `growth` of what it needs
  (nodes and edges scaled together, a quarter batch at least, rounded to
  64), the ladder ends at the worst case, and padding an epoch's batches
  costs far less than with the three coarse budgets."""
  dataset = load("proteins")
  batch_size, growth = 32, 1.1
  ladder = data.make_budgets(dataset.graphs, batch_size, growth=growth)
  coarse = data.make_budgets(dataset.graphs, batch_size)
  assert ladder[-1] == coarse[-1]  # Both end at the batch of the largest.
  assert [b.n_node for b in ladder] == sorted(b.n_node for b in ladder)
  assert [b.n_edge for b in ladder] == sorted(b.n_edge for b in ladder)
  n_node = np.array([int(g.n_node[0]) for g in dataset.graphs])
  n_edge = np.array([int(g.n_edge[0]) for g in dataset.graphs])
  mean_nodes, mean_edges = (
    batch_size * n_node.mean(),
    batch_size * n_edge.mean(),
  )
  padded = {"ladder": 0, "coarse": 0}
  indices = dataset.folds[0].train
  for name, budgets in (("ladder", ladder), ("coarse", coarse)):
    rng = np.random.default_rng(0)
    for batch in data.iterate_batches(
      dataset, indices, batch_size, budgets, shuffle=True, rng=rng
    ):
      nodes, edges = len(batch.graph.nodes), len(batch.graph.senders)
      padded[name] += nodes + edges
      if name == "ladder":
        real = int(batch.graph_mask.sum())
        need = max(
          0.25,
          (int(batch.graph.n_node[:real].sum()) + 1) / mean_nodes,
          int(batch.graph.n_edge[:real].sum()) / mean_edges,
        )
        assert nodes <= growth * need * mean_nodes + 1 + 64
        assert edges <= growth * need * mean_edges + 1 + 64
  real = int(n_node[indices].sum() + n_edge[indices].sum())
  assert padded["ladder"] < 1.15 * real < padded["coarse"]


def test_make_budgets_rejects_a_ladder_that_does_not_grow(load):
  graphs = load("mutag").graphs
  for growth in (1.0, 0.5, -2.0):
    with pytest.raises(ValueError, match="growth must be 0"):
      data.make_budgets(graphs, 8, growth=growth)
  # Graphs without edges: the nodes set the ladder.
  edgeless = [g._replace(n_edge=np.array([0], np.int32)) for g in graphs]
  budgets = data.make_budgets(edgeless, 8, growth=1.2)
  assert all(b.n_edge == 64 for b in budgets) and len(budgets) > 3


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_batches_covers_an_epoch(load, shuffle):
  dataset = load("proteins")
  batch_size = 32
  budgets = data.make_budgets(dataset.graphs, batch_size)
  indices = dataset.folds[0].train
  rng = np.random.default_rng(0)
  batches = list(
    data.iterate_batches(
      dataset, indices, batch_size, budgets, shuffle=shuffle, rng=rng
    )
  )
  assert len(batches) == -(-len(indices) // batch_size)
  seen_labels, seen_sizes, shapes = [], [], set()
  for batch in batches:
    graph = batch.graph
    shape = data.PaddingBudget(
      len(graph.nodes), len(graph.senders), len(graph.n_node)
    )
    assert shape in budgets
    assert graph.senders.dtype == graph.receivers.dtype == np.int32
    assert graph.n_node.dtype == np.int32
    shapes.add(shape)
    num_real = int(batch.graph_mask.sum())
    assert 1 <= num_real <= batch_size
    assert batch.graph_mask[:num_real].all()
    real_nodes = int(graph.n_node[:num_real].sum())
    assert int(batch.node_mask.sum()) == real_nodes
    assert batch.node_mask[:real_nodes].all()
    assert batch.labels.dtype == np.int32
    assert not batch.labels[num_real:].any()
    assert batch.node_mask.shape == (shape.n_node,)
    seen_labels.append(batch.labels[:num_real])
    seen_sizes.append(graph.n_node[:num_real])
  assert len(shapes) <= 3
  order = np.random.default_rng(0).permutation(indices) if shuffle else indices
  # Every graph once, in the (shuffled) order.
  np.testing.assert_array_equal(
    np.concatenate(seen_labels), dataset.labels[order]
  )
  n_node = np.array([int(g.n_node[0]) for g in dataset.graphs])
  np.testing.assert_array_equal(np.concatenate(seen_sizes), n_node[order])


@pytest.mark.parametrize("name", ["mutag", "proteins"])
def test_batches_equal_jraph_batch_and_pad(load, name):
  dataset = load(name)
  budgets = data.make_budgets(dataset.graphs, 16)
  rng = np.random.default_rng(1)
  indices = rng.permutation(len(dataset.graphs))[:50]
  batches = data.iterate_batches(dataset, indices, 16, budgets, shuffle=False)
  for start, batch in zip(range(0, 50, 16), batches, strict=True):
    graph_ids = indices[start : start + 16]
    joined = jraph.batch_np([dataset.graphs[i] for i in graph_ids])
    budget = data.PaddingBudget(
      len(batch.graph.nodes), len(batch.graph.senders), len(batch.labels)
    )
    expected = jraph.pad_with_graphs(joined, *budget)
    for field in ("nodes", "senders", "receivers", "n_node", "n_edge"):
      np.testing.assert_array_equal(
        getattr(batch.graph, field), getattr(expected, field), err_msg=field
      )
    assert batch.graph.edges is None and batch.graph.globals is None


def test_iterate_batches_rejects_bad_arguments(load):
  dataset = load("mutag")
  budgets = data.make_budgets(dataset.graphs, 8)
  with pytest.raises(ValueError, match="shuffle=True needs an rng"):
    data.iterate_batches(dataset, np.arange(10), 8, budgets, shuffle=True)
  tiny = (data.PaddingBudget(n_node=64, n_edge=64, n_graph=9),)
  with pytest.raises(ValueError, match="fits none of the budgets"):
    next(data.iterate_batches(dataset, np.arange(10), 8, tiny, shuffle=False))


def test_reddit_budgets_fit_the_largest_graphs(load):
  graphs = load("reddit-binary").graphs
  budgets = data.make_budgets(graphs, batch_size=64)
  largest = sorted(graphs, key=lambda g: -int(g.n_edge[0]))[:64]
  batch = next(
    data.iterate_batches(
      data.GraphDataset(
        name="largest",
        graphs=tuple(largest),
        labels=np.zeros(64, np.int32),
        num_classes=1,
        folds=(),
      ),
      np.arange(64),
      64,
      budgets,
      shuffle=False,
    )
  )
  assert len(batch.graph.nodes) in {b.n_node for b in budgets}


# --- Names and errors --------------------------------------------------------


def test_dataset_names():
  assert len(data.DATASET_NAMES) == 18
  assert data.is_node_dataset("Cora")
  assert data.is_node_dataset("amazon-photo")
  assert data.is_node_dataset("npz/any_graph.npz")
  assert not data.is_node_dataset("REDDIT-BINARY")
  assert not data.is_node_dataset("tu-nci1")
  assert not data.is_node_dataset("mnist-superpixels")
  assert not data.is_node_dataset("aqsol")


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match=r"Unknown dataset 'qm9'.*cora.*tu-nci1"):
    data.load_dataset("qm9", "unused")
  with pytest.raises(ValueError, match="Unknown dataset"):
    data.is_node_dataset("qm9")


def test_unknown_node_features_option(data_dir):
  with pytest.raises(
    ValueError, match=r"node_features option 'onehot'.*'auto', 'tags', 'degree'"
  ):
    data.load_dataset("mutag", data_dir, node_features="onehot")


def test_missing_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv(files.DATA_DIR_ENV, raising=False)
  with pytest.raises(
    FileNotFoundError,
    match=r"No data directory was given.*--data-dir.*LORAP_DATA_DIR.*"
    r"planetoid/<name>/ind\.<name>\.\*",
  ):
    data.load_dataset("cora")
  absent = tmp_path / "absent"
  with pytest.raises(
    FileNotFoundError, match=re.escape(f"{absent} does not exist")
  ):
    data.resolve_data_dir(absent)


def test_data_dir_from_environment(monkeypatch, data_dir):
  monkeypatch.setenv(files.DATA_DIR_ENV, str(data_dir))
  assert data.resolve_data_dir(None) == data_dir


def test_missing_file(data_dir, tmp_path):
  _copy_tree(data_dir / "planetoid" / "cora", tmp_path / "planetoid" / "cora")
  missing = tmp_path / "planetoid" / "cora" / "ind.cora.tx"
  missing.unlink()
  with pytest.raises(
    FileNotFoundError,
    match=r"planetoid/cora/ind\.cora\.tx is missing: expected it at "
    + re.escape(str(missing)),
  ):
    data.load_planetoid("cora", tmp_path)


def test_corrupted_file(data_dir, tmp_path):
  _copy_tree(data_dir / "planetoid" / "cora", tmp_path / "planetoid" / "cora")
  corrupted = tmp_path / "planetoid" / "cora" / "ind.cora.allx"
  content = bytearray(corrupted.read_bytes())
  content[1000] ^= 0xFF
  corrupted.write_bytes(bytes(content))
  with pytest.raises(
    data.DataFileError,
    match=r"planetoid/cora/ind\.cora\.allx .*expected [0-9a-f]{64}: the file "
    r"is corrupt or a different version; replace it",
  ):
    data.load_dataset("cora", tmp_path)


def test_files_are_hashed_once(data_dir, tmp_path, monkeypatch):
  relative = "planetoid/cora/ind.cora.y"
  copy = tmp_path / relative
  copy.parent.mkdir(parents=True)
  shutil.copyfile(data_dir / relative, copy)
  hashed = []
  real_sha256 = files._sha256_of
  monkeypatch.setattr(
    files, "_sha256_of", lambda path: hashed.append(path) or real_sha256(path)
  )
  assert data.require_file(tmp_path, relative) == copy
  data.require_file(tmp_path, relative)
  assert len(hashed) == 1
  stat = copy.stat()
  os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
  data.require_file(tmp_path, relative)  # changed, so checked again
  assert len(hashed) == 2


def _write_toy(root: pathlib.Path, text: str, num_graphs: int = 2) -> None:
  """Writes gin/TOY/TOY.txt and folds alternating between graphs 0 and 1."""
  folder = root / "gin" / "TOY"
  (folder / "10fold_idx").mkdir(parents=True)
  (folder / "TOY.txt").write_text(text)
  for k in range(1, 11):
    (folder / "10fold_idx" / f"test_idx-{k}.txt").write_text(f"{k % 2}\n")
    pool = "".join(f"{i}\n" for i in range(num_graphs) if i != k % 2)
    (folder / "10fold_idx" / f"train_idx-{k}.txt").write_text(pool)


def test_toy_gin_file(tmp_path):
  # Graph 0 lists a self-loop, a duplicate and a one-sided edge; labels are
  # arbitrary integers.
  _write_toy(tmp_path, "2\n3 5\n1 3 1 1 0\n2 0\n1 1 1\n2 -1\n4 1 1\n4 0\n")
  dataset = data.load_gin_format("TOY", tmp_path)
  np.testing.assert_array_equal(dataset.labels, [1, 0])
  assert dataset.num_classes == 2
  first = dataset.graphs[0]
  np.testing.assert_array_equal(first.senders, [1, 0, 2, 1])
  np.testing.assert_array_equal(first.receivers, [0, 1, 1, 2])
  # Tags 1, 2, 4 -> one-hot over three values.
  np.testing.assert_array_equal(first.nodes.argmax(axis=1), [0, 1, 0])
  np.testing.assert_array_equal(dataset.graphs[1].nodes.argmax(axis=1), [2, 2])
  np.testing.assert_array_equal(dataset.folds[0].test, [1])
  np.testing.assert_array_equal(dataset.folds[0].val, [0])


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("1\n2 0\n0 1 5\n0 1 0\n", r"TOY\.txt, line 3: neighbour index 5 is "),
    ("1\n2 0\n0 2 1\n0 1 0\n", r"line 3: the node declares 2 neighbours but"),
    ("1\n2 0\n0 1 x\n0 1 0\n", r"line 3: 'x' is not a number"),
    ("2\n2 0\n0 1 1\n0 1 0\n3 1\n0 0\n", r"line 5: graph 1 declares 3 nodes"),
    ("3\n1 0\n0 0\n", r"ends after line 3 but line 1 declares 3 graphs"),
    ("1\n1 0\n0 0\n1 0\n", r"line 4: unexpected content after the 1 graphs"),
    ("1\n1 0 7\n0 0\n", r"line 2: expected the header `num_nodes label`"),
  ],
)
def test_malformed_gin_file(tmp_path, text, message):
  _write_toy(tmp_path, text)
  with pytest.raises(data.DataFileError, match=message):
    data.load_gin_format("TOY", tmp_path)
