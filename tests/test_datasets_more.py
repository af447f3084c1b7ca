"""Tests of the Amazon (.npz), MNIST superpixel and AqSol loaders and the
per-dataset configs, against the data README's verified counts (sections 5
to 7)."""

import importlib.util
import json
import logging
import pathlib
import pickle
import sys
import zipfile

import jraph
import numpy as np
import pytest
import scipy.sparse

import lorap_jax
from lorap_jax._src import config as config_lib
from lorap_jax._src import data
from lorap_jax._src.data import cache, molecules, npz, superpixels

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (nodes, directed edges, features, classes, class counts, LCC nodes,
# LCC undirected edges, feature non-zeros). Data README, section 7.
AMAZON_COUNTS = {
  "amazon-photo": (
    7650,
    238162,
    745,
    8,
    [369, 1686, 703, 915, 882, 823, 1941, 331],
    7487,
    119043,
    1979909,
  ),
  "amazon-computers": (
    13752,
    491722,
    767,
    10,
    [436, 2142, 1414, 542, 5158, 308, 487, 818, 2156, 291],
    13381,
    245778,
    3675081,
  ),
}
# Data README, section 5.
MNIST_LABEL_COUNTS = {
  "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
  "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}

needs_skimage = pytest.mark.skipif(
  importlib.util.find_spec("skimage") is None,
  reason="scikit-image (the datasets extra) is not installed",
)
needs_rdkit = pytest.mark.skipif(
  importlib.util.find_spec("rdkit") is None,
  reason="RDKit (the datasets extra) is not installed",
)


def _assert_canonical(graph: jraph.GraphsTuple):
  num_nodes = graph.nodes.shape[0]
  senders, receivers = graph.senders, graph.receivers
  assert senders.dtype == receivers.dtype == np.int32
  expected = data.canonical_edges(senders, receivers, num_nodes)
  np.testing.assert_array_equal(senders, expected[0])
  np.testing.assert_array_equal(receivers, expected[1])


# --- Amazon Photo / Computers (.npz) -----------------------------------------


@pytest.fixture(scope="module")
def amazon(data_dir):
  """The two Amazon sets, raw features, loaded once for the module."""
  return {
    name: data.load_dataset(name, data_dir, normalize_features=False)
    for name in AMAZON_COUNTS
  }


@pytest.mark.parametrize("name", sorted(AMAZON_COUNTS))
def test_amazon_counts(amazon, name):
  nodes, edges, width, classes, counts, *_, nonzeros = AMAZON_COUNTS[name]
  dataset = amazon[name]
  assert isinstance(dataset, data.NodeDataset)
  assert dataset.name == name
  assert dataset.graph.nodes.shape == (nodes, width)
  assert dataset.graph.nodes.dtype == np.float32
  assert len(dataset.graph.senders) == edges
  _assert_canonical(dataset.graph)
  assert dataset.num_classes == classes
  assert np.bincount(dataset.labels).tolist() == counts
  # A binary bag of words.
  assert np.count_nonzero(dataset.graph.nodes) == nonzeros
  assert set(np.unique(dataset.graph.nodes).tolist()) == {0.0, 1.0}
  # Seed 0's Shchur et al. split: 20 / 30 per class, the rest tests.
  assert dataset.random_split
  assert dataset.train_mask.sum() == 20 * classes
  assert dataset.val_mask.sum() == 30 * classes
  assert dataset.test_mask.sum() == nodes - 50 * classes
  for mask, per_class in ((dataset.train_mask, 20), (dataset.val_mask, 30)):
    assert (np.bincount(dataset.labels[mask]) == per_class).all()


@pytest.mark.parametrize("name", sorted(AMAZON_COUNTS))
def test_amazon_largest_component(data_dir, name):
  *_, lcc_nodes, lcc_edges, _ = AMAZON_COUNTS[name]
  dataset = data.load_dataset(name, data_dir, largest_component=True)
  assert dataset.graph.nodes.shape[0] == lcc_nodes
  assert len(dataset.graph.senders) == 2 * lcc_edges
  assert dataset.test_mask.sum() == lcc_nodes - 50 * dataset.num_classes
  # Row-normalised features (the loader's default).
  np.testing.assert_allclose(dataset.graph.nodes.sum(axis=1), 1.0, rtol=1e-5)


def test_amazon_split_follows_the_seed(amazon):
  dataset = amazon["amazon-photo"]
  assert dataset.split_for_seed(0).train_mask.tolist() == (
    dataset.train_mask.tolist()
  )
  first, again = dataset.split_for_seed(7), dataset.split_for_seed(7)
  other = dataset.split_for_seed(8)
  for mask in ("train_mask", "val_mask", "test_mask"):
    np.testing.assert_array_equal(getattr(first, mask), getattr(again, mask))
  assert (first.train_mask != other.train_mask).any()
  cover = (
    first.train_mask.astype(int)
    + first.val_mask.astype(int)
    + first.test_mask.astype(int)
  )
  assert (cover == 1).all()
  # The graph, features and labels are shared, not copied.
  assert first.graph is dataset.graph and first.labels is dataset.labels


def _reference_split(labels, seed, train_per_class, val_per_class):
  """gnn-benchmark's get_train_val_test_split, written as it is there."""
  random_state = np.random.RandomState(seed)
  num_classes = labels.max() + 1

  def sample_per_class(count, forbidden=None):
    per_class = {c: [] for c in range(num_classes)}
    for c in range(num_classes):
      for i in range(len(labels)):
        if labels[i] == c and (forbidden is None or i not in forbidden):
          per_class[c].append(i)
    return np.concatenate(
      [
        random_state.choice(per_class[c], count, replace=False)
        for c in range(num_classes)
      ]
    )

  train = sample_per_class(train_per_class)
  val = sample_per_class(val_per_class, forbidden=train)
  test = np.setdiff1d(np.arange(len(labels)), np.concatenate([train, val]))
  return train, val, test


def test_random_split_matches_gnn_benchmark():
  labels = np.random.default_rng(0).integers(0, 4, size=300)
  for seed in (0, 1, 123):
    masks = data.random_per_class_split(
      labels, seed, train_per_class=5, val_per_class=7
    )
    reference = _reference_split(labels, seed, 5, 7)
    for mask, indices in zip(masks, reference, strict=True):
      assert np.flatnonzero(mask).tolist() == sorted(indices.tolist())


def test_random_split_refuses_small_classes():
  labels = np.array([0] * 60 + [1] * 10)
  with pytest.raises(data.DatasetError, match="Class 1 has 10 node"):
    data.random_per_class_split(labels, 0)


def _toy_graph(num_classes=3, per_class=60, width=12, seed=0):
  """A random graph whose features carry the class, as scipy matrices."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  num_nodes = len(labels)
  features = (rng.random((num_nodes, width)) < 0.2).astype(np.float32)
  features[np.arange(num_nodes), labels] = 1.0
  # Mostly within-class edges, stored in one direction.
  senders = rng.integers(0, num_nodes, 4 * num_nodes)
  receivers = np.where(
    rng.random(len(senders)) < 0.8,
    labels[senders] * per_class + rng.integers(0, per_class, len(senders)),
    rng.integers(0, num_nodes, len(senders)),
  )
  adjacency = scipy.sparse.csr_matrix(
    (np.ones(len(senders), np.float32), (senders, receivers)),
    shape=(num_nodes, num_nodes),
  )
  adjacency.sum_duplicates()
  adjacency.data[:] = 1.0
  return adjacency, scipy.sparse.csr_matrix(features), labels


def _save_gallery(path, adjacency, features, labels):
  """Writes the GraphGallery layout (pickled scipy matrices)."""
  np.savez(
    path,
    adj_matrix=np.array(adjacency, dtype=object),
    node_attr=np.array(features, dtype=object),
    node_label=labels,
    metadata=np.array({"class_names": np.array(["a", "b", "c"])}),
  )


def _save_benchmark(path, adjacency, features, labels):
  """Writes gnn-benchmark's layout (CSR components, no pickles)."""
  np.savez(
    path,
    adj_data=adjacency.data,
    adj_indices=adjacency.indices,
    adj_indptr=adjacency.indptr,
    adj_shape=np.array(adjacency.shape),
    attr_data=features.data,
    attr_indices=features.indices,
    attr_indptr=features.indptr,
    attr_shape=np.array(features.shape),
    labels=labels,
  )


@pytest.mark.parametrize("save", [_save_gallery, _save_benchmark])
def test_any_npz_graph_loads(tmp_path, save):
  adjacency, features, labels = _toy_graph()
  (tmp_path / "npz").mkdir()
  save(tmp_path / "npz" / "toy.npz", adjacency, features, labels)
  dataset = data.load_dataset("npz/toy.npz", tmp_path, normalize_features=False)
  assert dataset.name == "npz/toy.npz"
  np.testing.assert_array_equal(dataset.graph.nodes, features.toarray())
  np.testing.assert_array_equal(dataset.labels, labels)
  symmetric = adjacency + adjacency.T
  symmetric.setdiag(0)
  symmetric.eliminate_zeros()
  assert len(dataset.graph.senders) == symmetric.nnz
  _assert_canonical(dataset.graph)
  assert dataset.train_mask.sum() == 60 and dataset.val_mask.sum() == 90
  direct = data.load_npz_graph(tmp_path / "npz" / "toy.npz", name="toy")
  assert direct.name == "toy" and direct.random_split


def test_npz_refuses_unexpected_pickled_objects(tmp_path):
  class Payload:
    def __reduce__(self):
      return (print, ("this must never run",))

  path = tmp_path / "evil.npz"
  np.savez(
    path,
    adj_matrix=np.array(Payload(), dtype=object),
    node_attr=np.zeros((2, 2)),
    node_label=np.zeros(2, np.int32),
  )
  with pytest.raises(data.DataFileError, match=r"refusing to unpickle .*print"):
    data.load_npz_graph(path)


def test_npz_errors(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match=r"npz/amazon_photo\.npz"):
    data.load_dataset("amazon-photo", tmp_path)
  with pytest.raises(FileNotFoundError, match=r"npz/other\.npz"):
    data.load_dataset("npz/other.npz", data_dir)
  path = tmp_path / "keys.npz"
  np.savez(path, something=np.zeros(3))
  with pytest.raises(data.DataFileError, match="neither the GraphGallery"):
    data.load_npz_graph(path)
  (tmp_path / "broken.npz").write_bytes(b"not a zip file")
  with pytest.raises(data.DataFileError, match=r"not an \.npz"):
    data.load_npz_graph(tmp_path / "broken.npz")


def _gallery_with(**changes):
  """Writes the toy graph in the GraphGallery layout with `changes` applied
  to its (adjacency, features, labels)."""
  adjacency, features, labels = _toy_graph()
  parts = dict(adjacency=adjacency, features=features, labels=labels)
  parts.update(changes)
  return lambda path: _save_gallery(path, **parts)


def _benchmark_without(*keys, **changes):
  """Writes the toy graph in gnn-benchmark's layout, less `keys`, with
  the arrays `changes` names replaced."""

  def save(path):
    _save_benchmark(path, *_toy_graph())
    arrays = dict(np.load(path))
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if k not in keys})

  return save


def _corrupt_member(path):
  """The toy graph whose labels member is not an .npy array."""
  _benchmark_without("labels")(path)
  with zipfile.ZipFile(path, "a") as archive:
    archive.writestr("labels.npy", b"not an array")


NPZ_CASES = {
  "adjacency_not_square": (
    _gallery_with(adjacency=scipy.sparse.csr_matrix(np.ones((180, 181)))),
    r"the adjacency is \(180, 181\), not square",
  ),
  "features_for_fewer_nodes": (
    _gallery_with(features=scipy.sparse.csr_matrix(np.ones((179, 4)))),
    r"180 nodes in the adjacency, but features of shape \(179, 4\)",
  ),
  "multi_label": (
    _gallery_with(labels=np.ones((180, 3), np.int64)),
    r"labels of shape \(180, 3\)",
  ),
  "float_labels": (
    _gallery_with(labels=np.zeros(180, np.float32)),
    r"labels must be integers \(one class per node\), found dtype float32",
  ),
  "negative_label": (
    _gallery_with(labels=np.r_[-1, np.zeros(179, np.int64)]),
    r"label -1 is negative; every node needs a class",
  ),
  "adjacency_not_a_matrix": (
    _gallery_with(adjacency=np.zeros(180)),
    r"'adj_matrix' should hold a sparse or dense 2-D matrix, found ndarray",
  ),
  "no_features": (
    _benchmark_without(
      "attr_data", "attr_indices", "attr_indptr", "attr_shape"
    ),
    r"has no node features \(attr_\*\)",
  ),
  "broken_csr": (
    _benchmark_without(adj_indptr=np.array([0, 1])),
    r"the adj_\* arrays are not a valid CSR matrix",
  ),
  "member_not_an_array": (
    _corrupt_member,
    r"Cannot read array 'labels' of .*toy\.npz",
  ),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_malformed_npz_files(tmp_path, case):
  save, message = NPZ_CASES[case]
  save(tmp_path / "toy.npz")
  with pytest.raises(data.DataFileError, match=message):
    data.load_npz_graph(tmp_path / "toy.npz")


def test_fixed_split_datasets_ignore_the_seed():
  graph = jraph.GraphsTuple(
    nodes=np.eye(3, dtype=np.float32),
    edges=None,
    globals=None,
    senders=np.array([1, 0], np.int32),
    receivers=np.array([0, 1], np.int32),
    n_node=np.array([3], np.int32),
    n_edge=np.array([2], np.int32),
  )
  masks = [np.array(m, dtype=bool) for m in np.eye(3)]
  dataset = data.NodeDataset("toy", graph, np.array([0, 1, 0]), *masks, 2)
  assert not dataset.random_split
  assert dataset.split_for_seed(5) is dataset
  broken = data.NodeDataset(
    "toy", graph, np.array([0, 1, 0]), *masks, 2, split_fn="nope"
  )
  with pytest.raises(data.DatasetError, match="split_fn must be"):
    data.validate_node_dataset(broken)
  # A split function that draws overlapping masks is caught per seed.
  overlapping = data.NodeDataset(
    "toy",
    graph,
    np.array([0, 1, 0]),
    *masks,
    2,
    split_fn=lambda seed: (masks[0], masks[0], masks[2]),
  )
  with pytest.raises(data.DatasetError, match="share"):
    overlapping.split_for_seed(1)


def test_training_draws_a_split_per_seed(tmp_path):
  """A toy npz graph trains with per-seed splits, vmapped or not alike."""
  adjacency, features, labels = _toy_graph()
  (tmp_path / "data" / "npz").mkdir(parents=True)
  _save_gallery(
    tmp_path / "data" / "npz" / "toy.npz", adjacency, features, labels
  )
  summaries = []
  for vmap in (False, True):
    config = lorap_jax.get_config("npz/toy.npz")
    config.data_dir = str(tmp_path / "data")
    config.seeds = 2
    config.vmap_seeds = vmap
    config.train.epochs = 2
    config.model.hidden = 8
    config.quant.framework = "fp32"
    config.prompt.kind = "none"
    config.checkpoint.enabled = False
    summaries.append(
      lorap_jax.train_and_evaluate(config, tmp_path / f"run_{vmap}")
    )
  sequential, vmapped = summaries
  np.testing.assert_allclose(
    sequential["test_accs"], vmapped["test_accs"], atol=1e-6
  )
  # The two seeds are evaluated on different splits.
  dataset = data.load_dataset("npz/toy.npz", tmp_path / "data")
  assert (
    dataset.split_for_seed(0).test_mask != dataset.split_for_seed(1).test_mask
  ).any()


# --- Configs ------------------------------------------------------------------


def test_every_dataset_has_a_config():
  assert set(config_lib.DATASET_DEFAULTS) == set(data.DATASET_NAMES)
  for name in data.DATASET_NAMES:
    config = lorap_jax.get_config(name)
    assert config.dataset == name
    node_task = data.is_node_dataset(name)
    assert config.model.architecture == ("gcn" if node_task else "gin")
  assert lorap_jax.get_config("amazon-photo").normalize_features is False
  mnist = lorap_jax.get_config("mnist-superpixels")
  assert (mnist.model.num_layers, mnist.model.hidden, mnist.folds) == (
    4,
    110,
    1,
  )
  assert lorap_jax.get_config("aqsol").train.selection == "val_mae"
  assert lorap_jax.get_config("npz/coauthor_cs.npz").model.architecture == "gcn"


def _dataset_of_data_path(relative: str) -> str | None:
  """The dataset name a directory or file of the data README maps to."""
  top, _, rest = relative.partition("/")
  gin_names = {v: k for k, v in data.datasets._GIN_DIRS.items()}
  if top == "planetoid":
    return rest
  if top == "gin":
    return gin_names[rest]
  if top == "tu":
    return f"tu-{rest.lower()}"
  if top == "npz":
    named = {v: k for k, v in npz.AMAZON_FILES.items()}
    return named.get(relative, relative)
  return {"mnist": "mnist-superpixels", "aqsol": "aqsol", "zinc": None}[top]


def test_every_data_directory_has_a_config(data_dir):
  entries = [
    f"{top.name}/{entry.name}"
    for top in sorted(data_dir.iterdir())
    if top.is_dir() and top.name not in ("mnist", "aqsol", "zinc")
    for entry in sorted(top.iterdir())
    if entry.is_dir() or entry.suffix == ".npz"
  ] + ["mnist/raw", "aqsol/", "zinc/"]
  for relative in entries:
    name = _dataset_of_data_path(relative)
    if name is None:  # ZINC: only the split indices, no molecules.
      continue
    assert name in data.DATASET_NAMES or name.startswith("npz/"), relative
    assert lorap_jax.get_config(name).dataset == name


def _load_config_file(path: pathlib.Path, argument: str | None = None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if argument is None:
    return module.get_config()
  return module.get_config(argument)


def test_experiment_config_files():
  directory = REPO_ROOT / "experiments" / "configs"
  files = {p.stem for p in directory.glob("*.py")}
  # One file per dataset of the data directory, named like the dataset.
  for name in config_lib.DATASET_DEFAULTS:
    if name.startswith("tu-"):
      continue  # the same graphs as the GIN files, also via dataset.py
    stem = name.replace("-", "_")
    assert stem in files, f"experiments/configs/{stem}.py is missing"
    from_file = _load_config_file(directory / f"{stem}.py")
    assert from_file.to_dict() == lorap_jax.get_config(name).to_dict()
  # Any name, including ones added later, through dataset.py:<name>.
  for name in (*data.DATASET_NAMES, "npz/amazon_cs.npz"):
    from_file = _load_config_file(directory / "dataset.py", name)
    assert from_file.dataset == name


def test_mutag_config_trains_two_epochs(data_dir, tmp_path):
  config = _load_config_file(REPO_ROOT / "experiments/configs/mutag.py")
  config.data_dir = str(data_dir)
  config.folds = 1
  config.train.epochs = 2
  # Tiny, so that compiling stays short: the config's path is what counts.
  config.model.hidden = 8
  config.model.num_layers = 2
  config.quant.framework = "fp32"
  config.prompt.kind = "none"
  config.checkpoint.enabled = False
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  assert summary["num_runs"] == 1 and summary["dataset"] == "mutag"
  assert 0.0 <= summary["test_acc_mean"] <= 1.0


# --- MNIST superpixels -------------------------------------------------------


def test_mnist_raw_files(data_dir):
  for split, counts in MNIST_LABEL_COUNTS.items():
    images, labels = superpixels.read_mnist(data_dir, split)
    assert images.shape == (sum(counts), 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == counts
  images, _ = superpixels.read_mnist(data_dir, "test")
  # Data README: test pixel mean / 255.
  assert images.mean() / 255 == pytest.approx(0.1325146058, abs=1e-9)


def _reference_kernel(coords, intensity, use_intensity):
  """benchmarking-gnns' compute_adjacency_matrix_images, as written there."""
  from scipy.spatial.distance import cdist

  def sigma(dists, kth=8):
    try:
      knns = np.partition(dists, kth, axis=-1)[:, kth::-1]
      value = knns.sum(axis=1).reshape((knns.shape[0], 1)) / kth
    except ValueError:
      value = np.array([1] * dists.shape[0]).reshape(dists.shape[0], 1)
    return value + 1e-8

  c_dist = cdist(coords, coords)
  if use_intensity:
    feat = intensity.reshape(-1, 1)
    f_dist = cdist(feat, feat)
    kernel = np.exp(
      -((c_dist / sigma(c_dist)) ** 2) - (f_dist / sigma(f_dist)) ** 2
    )
  else:
    kernel = np.exp(-((c_dist / sigma(c_dist)) ** 2))
  kernel = 0.5 * (kernel + kernel.T)
  kernel[np.diag_indices_from(kernel)] = 0
  return kernel


@pytest.mark.parametrize("edge_kernel", superpixels.EDGE_KERNELS)
@pytest.mark.parametrize("num_nodes", [5, 9, 40])
def test_knn_graph_matches_benchmarking_gnns_kernel(edge_kernel, num_nodes):
  rng = np.random.default_rng(num_nodes)
  coords, intensity = rng.random((num_nodes, 2)), rng.random(num_nodes)
  senders, receivers, weights = superpixels.knn_graph(
    coords, intensity, edge_kernel=edge_kernel
  )
  kernel = _reference_kernel(coords, intensity, edge_kernel != "coord")
  np.testing.assert_allclose(weights, kernel[senders, receivers], rtol=1e-6)
  _assert_canonical(
    jraph.GraphsTuple(
      nodes=np.zeros((num_nodes, 1)),
      edges=None,
      globals=None,
      senders=senders,
      receivers=receivers,
      n_node=np.array([num_nodes]),
      n_edge=np.array([len(senders)]),
    )
  )
  adjacency = np.zeros((num_nodes, num_nodes), dtype=bool)
  adjacency[senders, receivers] = True
  if num_nodes <= 9:  # benchmarking-gnns: fully connected below 10 nodes
    assert adjacency.sum() == num_nodes * (num_nodes - 1)
  else:  # every node keeps its 8 most similar nodes
    top = np.argsort(-kernel, axis=1, kind="stable")[:, :8]
    assert adjacency[np.arange(num_nodes)[:, None], top].all()


@needs_skimage
def test_superpixel_graph_of_one_image(data_dir):
  images, _ = superpixels.read_mnist(data_dir, "test")
  nodes, senders, receivers, weights = superpixels.superpixel_graph(images[0])
  num_nodes = len(nodes)
  assert 10 < num_nodes <= 75 and nodes.shape == (num_nodes, 3)
  assert nodes.dtype == np.float32 and weights.dtype == np.float32
  assert (nodes >= 0).all() and (nodes <= 1).all()
  assert nodes[:, 0].max() > 0.5  # some superpixels cover the digit
  assert ((weights > 0) & (weights <= 1)).all()
  assert (np.bincount(receivers, minlength=num_nodes) >= 8).all()
  again = superpixels.superpixel_graph(images[0])
  arrays = (nodes, senders, receivers, weights)
  for first, second in zip(arrays, again, strict=True):
    np.testing.assert_array_equal(first, second)


@needs_skimage
def test_mnist_limited_build_and_cache(data_dir, tmp_path, monkeypatch):
  cache_dir = tmp_path / "cache"
  dataset = data.load_dataset(
    "mnist-superpixels", data_dir, cache_dir=cache_dir, limit=24, progress=False
  )
  assert isinstance(dataset, data.GraphDataset)
  assert len(dataset.graphs) == 48 and dataset.num_classes == 10
  assert dataset.num_features == 3
  (fold,) = dataset.folds
  assert (len(fold.train), len(fold.val), len(fold.test)) == (22, 2, 24)
  assert fold.val.tolist() == [0, 1]
  assert fold.test.tolist() == list(range(24, 48))
  _, train_labels = superpixels.read_mnist(data_dir, "train")
  _, test_labels = superpixels.read_mnist(data_dir, "test")
  np.testing.assert_array_equal(
    dataset.labels, np.concatenate([train_labels[:24], test_labels[:24]])
  )
  for graph in dataset.graphs:
    assert graph.edges.shape == graph.senders.shape
    assert graph.n_node[0] <= 75
  cached = sorted(p.name for p in cache_dir.iterdir())
  assert cached == [
    "mnist-superpixels-test-first24-n75-c0.25-k8-coord-v1.npz",
    "mnist-superpixels-train-first24-n75-c0.25-k8-coord-v1.npz",
  ]

  # The second load reads the cache: building would fail.
  def no_build(*args, **kwargs):
    raise AssertionError("the cached graphs were rebuilt")

  monkeypatch.setattr(superpixels, "build_graphs", no_build)
  again = data.load_dataset(
    "mnist-superpixels", data_dir, cache_dir=cache_dir, limit=24
  )
  for first, second in zip(dataset.graphs, again.graphs, strict=True):
    np.testing.assert_array_equal(first.nodes, second.nodes)
    np.testing.assert_array_equal(first.senders, second.senders)
    np.testing.assert_array_equal(first.edges, second.edges)
  monkeypatch.undo()

  # A damaged cache file is rebuilt, and replaced atomically.
  damaged = cache_dir / cached[1]
  damaged.write_bytes(damaged.read_bytes()[:100])
  rebuilt = data.load_dataset(
    "mnist-superpixels", data_dir, cache_dir=cache_dir, limit=24, progress=False
  )
  np.testing.assert_array_equal(
    rebuilt.graphs[3].nodes, dataset.graphs[3].nodes
  )
  assert sorted(p.name for p in cache_dir.iterdir()) == cached
  # The batching takes the graphs (and drops the edge weights).
  budgets = data.make_budgets(dataset.graphs, 16)
  batch = next(
    data.iterate_batches(dataset, fold.train, 16, budgets, shuffle=False)
  )
  assert batch.graph.edges is None and batch.labels.dtype == np.int32


@needs_skimage
def test_mnist_cache_key_follows_the_options(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "env_cache"))
  dataset = superpixels.load_mnist_superpixels(
    data_dir, limit=2, edge_kernel="coord+intensity", progress=False
  )
  assert len(dataset.graphs) == 4
  names = sorted(p.name for p in (tmp_path / "env_cache").iterdir())
  assert all("coord-intensity" in name and "first2" in name for name in names)


def test_mnist_options_and_missing_extra(data_dir, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="node_features='tags'"):
    data.load_dataset("mnist-superpixels", data_dir, node_features="tags")
  with pytest.raises(ValueError, match="edge_kernel='gauss'"):
    superpixels.load_mnist_superpixels(data_dir, edge_kernel="gauss")
  monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
  with pytest.raises(ImportError, match=r"pip install 'lorap_jax\[datasets\]'"):
    superpixels.load_mnist_superpixels(
      data_dir, cache_dir=tmp_path, limit=2, progress=False
    )
  with pytest.raises(FileNotFoundError, match=r"mnist/raw/train-images"):
    superpixels.load_mnist_superpixels(tmp_path, cache_dir=tmp_path, limit=2)


def test_cache_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  explicit = tmp_path / "explicit"
  assert cache.resolve_cache_dir(explicit) == explicit
  assert explicit.is_dir()
  monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "env"))
  assert cache.resolve_cache_dir(None) == tmp_path / "env"
  assert cache.resolve_cache_dir(explicit) == explicit
  monkeypatch.delenv(cache.CACHE_DIR_ENV)
  # Never inside the data directory, which may be shared or read-only.
  assert cache.resolve_cache_dir(None) == tmp_path / "xdg" / "lorap_jax"
  (tmp_path / "a_file").write_text("")
  with pytest.raises(OSError, match="cannot be created or written"):
    cache.resolve_cache_dir(tmp_path / "a_file" / "sub")


def test_cache_rebuilds_on_other_parameters(tmp_path, caplog):
  path = tmp_path / "arrays.npz"
  cache.save_arrays(path, {"x": np.arange(3)}, {"version": 1})
  assert cache.load_arrays(path, {"version": 1})["x"].tolist() == [0, 1, 2]
  with caplog.at_level(logging.WARNING):
    assert cache.load_arrays(path, {"version": 2}) is None
  assert "other parameters" in caplog.text
  assert [p.name for p in tmp_path.iterdir()] == ["arrays.npz"]


@pytest.mark.slow
@needs_skimage
def test_parallel_build_equals_the_serial_one(data_dir, monkeypatch):
  monkeypatch.setattr(superpixels, "_PARALLEL_MIN_IMAGES", 10)
  monkeypatch.setattr(superpixels, "_CHUNK_IMAGES", 15)
  images, _ = superpixels.read_mnist(data_dir, "test")
  parallel = superpixels.build_graphs(images[:40], num_workers=2)
  serial = superpixels.build_graphs(images[:40], num_workers=1)
  assert parallel.keys() == serial.keys()
  for key, value in serial.items():
    np.testing.assert_array_equal(parallel[key], value)


@pytest.mark.slow
@needs_skimage
def test_mnist_full_build(data_dir, tmp_path):
  dataset = data.load_dataset(
    "mnist-superpixels", data_dir, cache_dir=tmp_path, progress=False
  )
  (fold,) = dataset.folds
  assert len(fold.train) == 55000 and len(fold.val) == 5000
  assert len(fold.test) == 10000
  counts = np.bincount(dataset.labels[: len(fold.train) + len(fold.val)])
  assert counts.tolist() == MNIST_LABEL_COUNTS["train"]
  n_node = np.array([g.n_node[0] for g in dataset.graphs])
  assert n_node.max() <= 75 and n_node.min() >= 30
  # Data README: 67.3 / 65.3 nodes on the first 2,000 train / test images.
  assert n_node[:2000].mean() == pytest.approx(67.3, abs=0.05)
  assert n_node[60000:62000].mean() == pytest.approx(65.3, abs=0.05)


# --- AqSol --------------------------------------------------------------------


@pytest.fixture(scope="module")
def aqsol(data_dir):
  if importlib.util.find_spec("rdkit") is None:
    pytest.skip("RDKit (the datasets extra) is not installed")
  return data.load_dataset("aqsol", data_dir)


def test_aqsol_counts(aqsol):
  assert aqsol.task == "regression" and aqsol.num_classes == 1
  assert aqsol.labels.dtype == np.float32
  (fold,) = aqsol.folds
  # Data README, section 6: after benchmarking-gnns' filters.
  assert (len(fold.train), len(fold.val), len(fold.test)) == (7831, 996, 996)
  assert len(aqsol.graphs) == 9823
  n_node = np.array([g.n_node[0] for g in aqsol.graphs])
  n_edge = np.array([g.n_edge[0] for g in aqsol.graphs])
  assert n_node.mean() == pytest.approx(17.57, abs=0.005)
  assert n_edge.mean() / 2 == pytest.approx(17.88, abs=0.005)
  means = [aqsol.labels[part].mean() for part in fold]
  np.testing.assert_allclose(means, [-2.729, -3.410, -3.584], atol=5e-4)
  assert aqsol.num_features == 65
  for graph in aqsol.graphs[:50]:
    _assert_canonical(graph)
    assert graph.edges.dtype == np.int32
    assert set(np.unique(graph.edges).tolist()) <= {1, 2, 3, 4}
    np.testing.assert_array_equal(graph.nodes.sum(axis=1), 1.0)


def test_aqsol_batches_carry_float_targets(aqsol):
  (fold,) = aqsol.folds
  budgets = data.make_budgets(aqsol.graphs, 64)
  batch = next(
    data.iterate_batches(aqsol, fold.val, 64, budgets, shuffle=False)
  )
  assert batch.labels.dtype == np.float32
  np.testing.assert_array_equal(
    batch.labels[batch.graph_mask], aqsol.labels[fold.val[:64]]
  )


@needs_rdkit
def test_aqsol_smiles_builder_matches_the_stored_graphs(data_dir):
  """The RDKit builder reproduces benchmarking-gnns' val graphs."""
  atom_types = molecules._word2idx(data_dir, "atom")
  bond_types = molecules._word2idx(data_dir, "bond")
  stored = molecules._stored_molecules(data_dir, "val")
  rows = molecules._csv_rows(data_dir / molecules._CSV)
  rows_file = data_dir / "aqsol/derived_split_rows/val.txt"
  val_rows = [int(line) for line in rows_file.read_text().split()]
  checked = 0
  for row, expected in zip(val_rows[:150], stored, strict=False):
    built = molecules.molecule_from_smiles(*rows[row], atom_types, bond_types)
    if built is None:  # rows 4792 and 5043 no longer parse (README)
      continue
    np.testing.assert_array_equal(built.atoms, expected.atoms)
    np.testing.assert_array_equal(built.bonds, expected.bonds)
    np.testing.assert_array_equal(built.edge_index, expected.edge_index)
    assert built.target == pytest.approx(expected.target)
    checked += 1
  assert checked >= 148


def test_aqsol_node_feature_options(data_dir):
  if importlib.util.find_spec("rdkit") is None:
    pytest.skip("RDKit (the datasets extra) is not installed")
  with pytest.raises(ValueError, match="node_features='onehot'"):
    data.load_dataset("aqsol", data_dir, node_features="onehot")


def test_aqsol_missing_rdkit(data_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, "rdkit.Chem", None)
  with pytest.raises(ImportError, match=r"pip install 'lorap_jax\[datasets\]'"):
    data.load_dataset("aqsol", data_dir)


def test_aqsol_refuses_unexpected_pickled_objects(tmp_path):
  class Payload:
    def __reduce__(self):
      return (print, ("this must never run",))

  path = tmp_path / "val.pickle"
  path.write_bytes(pickle.dumps([Payload()]))
  with pytest.raises(data.DataFileError, match=r"refusing to unpickle .*print"):
    molecules._unpickle(path)


def test_aqsol_missing_files(tmp_path):
  with pytest.raises(
    FileNotFoundError, match=r"aqsol/asqol_graph_raw/atom_dict"
  ):
    data.load_dataset("aqsol", tmp_path)


# --- Regression datasets and edge features in validation ---------------------


def _graph(num_nodes=3, edges=None, senders=(1, 0), receivers=(0, 1)):
  return jraph.GraphsTuple(
    nodes=np.ones((num_nodes, 2), np.float32),
    edges=edges,
    globals=None,
    senders=np.array(senders, np.int32),
    receivers=np.array(receivers, np.int32),
    n_node=np.array([num_nodes], np.int32),
    n_edge=np.array([len(senders)], np.int32),
  )


def _regression_set(labels, graphs=None, num_classes=1, task="regression"):
  graphs = graphs or (_graph(), _graph())
  fold = data.Fold(*(np.array(p, np.int32) for p in ([0], [], [1])))
  return data.GraphDataset(
    "toy", tuple(graphs), np.asarray(labels), num_classes, (fold,), task
  )


def test_validation_of_regression_targets():
  checked = data.validate_graph_dataset(_regression_set([0.5, -1]))
  assert checked.labels.dtype == np.float32
  with pytest.raises(data.DatasetError, match="regression target 1 = nan"):
    data.validate_graph_dataset(_regression_set([0.5, np.nan]))
  with pytest.raises(data.DatasetError, match="must be 1"):
    data.validate_graph_dataset(_regression_set([0.5, 1.0], num_classes=2))
  with pytest.raises(data.DatasetError, match="task='ranking'"):
    data.validate_graph_dataset(_regression_set([0.5, 1.0], task="ranking"))
  # Classification still wants integer classes.
  with pytest.raises(data.DatasetError, match="labels must be integers"):
    data.validate_graph_dataset(
      _regression_set([0.5, 1.0], num_classes=2, task="classification")
    )


def test_validation_of_edge_features():
  weights = np.array([0.5, 0.5], np.float32)
  targets = np.array([0.0, 1.0], np.float32)
  good = _regression_set(targets, graphs=[_graph(edges=weights)] * 2)
  assert data.validate_graph_dataset(good).graphs[1].edges is weights
  short = _regression_set([0.0, 1.0], graphs=[_graph(edges=weights[:1])] * 2)
  with pytest.raises(data.DatasetError, match="one row per edge"):
    data.validate_graph_dataset(short)
  infinite = np.array([0.5, np.inf], np.float32)
  bad = _regression_set([0.0, 1.0], graphs=[_graph(edges=infinite)] * 2)
  with pytest.raises(data.DatasetError, match="NaN or infinite"):
    data.validate_graph_dataset(bad)
  # One direction only: the check would rewrite the edges, not the features.
  one_way = _graph(edges=weights[:1], senders=(1,), receivers=(0,))
  with pytest.raises(data.DatasetError, match="cannot be rewritten"):
    data.validate_graph_dataset(
      _regression_set([0.0, 1.0], graphs=[one_way] * 2)
    )


def test_checksums_cover_the_new_files(data_dir):
  known = json.loads(
    (REPO_ROOT / "lorap_jax/_src/data/checksums.json").read_text()
  )
  for relative in (
    "npz/amazon_photo.npz",
    "npz/amazon_cs.npz",
    "mnist/raw/train-images-idx3-ubyte.gz",
    "aqsol/curated-solubility-dataset.csv",
    "aqsol/asqol_graph_raw/val.pickle",
  ):
    assert relative in known
    assert (data_dir / relative).is_file()
