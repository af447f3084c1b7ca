"""The synthetic CSBM graphs: statistics, determinism, errors, wiring."""

import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import cli
from lorap_jax._src import train as train_lib


@pytest.fixture(scope="module")
def graph():
  return lorap_jax.make_csbm(
    20_000, num_classes=5, average_degree=8.0, homophily=0.7, seed=3
  )


def test_classes_are_balanced(graph):
  counts = np.bincount(graph.labels, minlength=5)
  assert counts.max() - counts.min() <= 1
  assert graph.num_classes == 5


def test_degree_and_homophily_are_the_requested(graph):
  g = graph.graph
  # Both directions of every edge: 2 m = n * average degree (few repeats).
  assert len(g.senders) / 20_000 == pytest.approx(8.0, rel=0.01)
  assert lorap_jax.edge_homophily(graph) == pytest.approx(0.7, abs=0.01)
  assert g.senders.dtype == np.int32 and g.nodes.dtype == np.float32
  assert not np.any(g.senders == g.receivers)
  # Undirected: the reversed edge set is the same set.
  key = g.receivers.astype(np.int64) * 20_000 + g.senders
  reverse = g.senders.astype(np.int64) * 20_000 + g.receivers
  np.testing.assert_array_equal(np.sort(reverse), key)


def test_features_carry_the_label(graph):
  features, labels = graph.graph.nodes, graph.labels
  means = np.stack([features[labels == c].mean(0) for c in range(5)])
  # Each class mean is a unit direction times signal 1; noise is N(0, 1).
  np.testing.assert_allclose(np.linalg.norm(means, axis=1), 1.0, atol=0.1)
  nearest = np.argmin(
    ((features[:, None, :] - means[None]) ** 2).sum(-1), axis=1
  )
  assert np.mean(nearest == labels) > 0.4  # chance: 0.2


def test_zero_signal_features_carry_nothing():
  data = lorap_jax.make_csbm(5000, num_classes=2, signal=0.0, seed=0)
  means = [data.graph.nodes[data.labels == c].mean(0) for c in range(2)]
  assert np.linalg.norm(means[0] - means[1]) < 0.2


def test_split_fractions_are_disjoint(graph):
  sizes = [int(m.sum()) for m in (graph.train_mask, graph.val_mask)]
  assert sizes == [2000, 2000]
  assert int(graph.test_mask.sum()) == 16_000
  assert not np.any(graph.train_mask & graph.val_mask)
  assert not np.any(graph.val_mask & graph.test_mask)


def test_same_seed_same_graph_other_seed_other_graph():
  a, b = (lorap_jax.make_csbm(2000, seed=7) for _ in range(2))
  c = lorap_jax.make_csbm(2000, seed=8)
  for field in ("senders", "receivers", "nodes"):
    np.testing.assert_array_equal(
      getattr(a.graph, field), getattr(b.graph, field)
    )
  np.testing.assert_array_equal(a.train_mask, b.train_mask)
  assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"num_nodes": 3, "num_classes": 4}, "num_nodes=3 must be at least"),
    ({"num_classes": 1}, "num_classes=1 must be at least 2"),
    ({"average_degree": -1.0}, r"average_degree=-1.0 must be in"),
    ({"homophily": 1.5}, r"homophily=1.5 must be in \[0, 1\]"),
    ({"homophily": -0.1}, r"homophily=-0.1 must be in \[0, 1\]"),
    ({"signal": -1.0}, "signal=-1.0 must be >= 0"),
    ({"num_features": 0}, "num_features=0 must be at least 1"),
    ({"num_nodes": 10.5}, "num_nodes=10.5 must be an integer"),
    ({"train_fraction": 0.0}, r"train_fraction=0.0 must be in \(0, 1\)"),
    ({"train_fraction": 0.6, "val_fraction": 0.5}, "more than 1"),
    ({"num_nodes": 20, "val_fraction": 0.01}, "selects no node"),
  ],
)
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lorap_jax.make_csbm(**{"num_nodes": 1000, **kwargs})


def test_csbm_is_a_node_dataset_of_its_config():
  assert lorap_jax.is_node_dataset("csbm")
  config = lorap_jax.get_config("csbm")
  config.csbm.num_nodes = 500
  config.csbm.num_classes = 3
  dataset = lorap_jax.load_dataset(
    "csbm", None, **train_lib.dataset_options(config)
  )
  assert dataset.graph.nodes.shape == (500, 32)
  assert dataset.num_classes == 3
  assert config.normalize_features is False


def test_command_line_sets_the_graph():
  args = cli._parser().parse_args(
    [
      "train",
      "--dataset",
      "csbm",
      "--workdir",
      "unused",
      "--set",
      "csbm.num_nodes=100000",
      "--set",
      "train.sampler=neighbor",
      "--set",
      "train.fanouts=(15, 5)",
    ]
  )
  config = cli.build_config(args)
  assert config.csbm.num_nodes == 100_000
  assert config.train.sampler == "neighbor"
  assert tuple(config.train.fanouts) == (15, 5)
