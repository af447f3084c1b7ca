"""Neighbour sampling: the subgraphs, their padding, and sampled training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib

FANOUTS = (4, 3)


@pytest.fixture(scope="module")
def dataset():
  return lorap_jax.make_csbm(3000, average_degree=6.0, seed=1)


@pytest.fixture(scope="module")
def csr(dataset):
  return lorap_jax.in_neighbor_csr(dataset.graph)


def _budget(dataset, batch_size, fanouts=FANOUTS):
  return lorap_jax.neighbor_budget(
    batch_size,
    fanouts,
    num_nodes=len(dataset.labels),
    num_edges=len(dataset.graph.senders),
  )


def _real_edges(batch):
  count = int(batch.graph.n_edge[0])
  ids = batch.node_ids
  return ids[batch.graph.senders[:count]], ids[batch.graph.receivers[:count]]


def test_csr_lists_in_neighbours(dataset, csr):
  g = dataset.graph
  v = 17
  expected = np.sort(g.senders[g.receivers == v])
  np.testing.assert_array_equal(
    np.sort(csr.indices[csr.indptr[v] : csr.indptr[v + 1]]), expected
  )


def test_sampled_subgraph(dataset, csr):
  rng = np.random.default_rng(0)
  seeds = np.flatnonzero(dataset.train_mask)[:50]
  budget = _budget(dataset, 50)
  batch = lorap_jax.sample_node_batch(dataset, csr, seeds, FANOUTS, budget, rng)
  graph = batch.graph
  # Fixed shapes: the budget, whatever was sampled.
  assert graph.nodes.shape == (budget.n_node, 32)
  assert graph.senders.shape == graph.receivers.shape == (budget.n_edge,)
  assert int(graph.n_node.sum()) == budget.n_node
  assert int(graph.n_edge.sum()) == budget.n_edge
  # Seeds first; the mask marks exactly them.
  np.testing.assert_array_equal(batch.node_ids[:50], seeds)
  assert batch.seed_mask.sum() == 50 and batch.seed_mask[:50].all()
  np.testing.assert_array_equal(batch.labels[:50], dataset.labels[seeds])
  np.testing.assert_array_equal(
    graph.nodes[: len(batch.node_ids)], dataset.graph.nodes[batch.node_ids]
  )
  assert len(np.unique(batch.node_ids)) == len(batch.node_ids)
  # Every sampled edge is an edge of the graph, sampled once.
  senders, receivers = _real_edges(batch)
  n = len(dataset.labels)
  graph_keys = dataset.graph.receivers.astype(np.int64) * n
  graph_keys += dataset.graph.senders
  keys = receivers.astype(np.int64) * n + senders
  assert np.isin(keys, graph_keys).all()
  assert len(np.unique(keys)) == len(keys)
  # Fanouts: seeds keep min(degree, 4) in-edges, hop-1 nodes min(degree, 3).
  degree = np.diff(csr.indptr)
  received = np.bincount(receivers, minlength=n)
  np.testing.assert_array_equal(
    received[seeds], np.minimum(degree[seeds], FANOUTS[0])
  )
  hop_1 = np.setdiff1d(senders[np.isin(receivers, seeds)], seeds)
  np.testing.assert_array_equal(
    received[hop_1], np.minimum(degree[hop_1], FANOUTS[1])
  )
  # Padding: zero features, masked, full-graph degrees on real nodes.
  real = int(graph.n_node[0])
  assert not graph.nodes[real:].any()
  info = graph.globals
  assert info.node_mask.sum() == real and info.node_mask[:real].all()
  np.testing.assert_array_equal(info.in_degree[:real], degree[batch.node_ids])
  assert (graph.senders[int(graph.n_edge[0]) :] == real).all()


def test_budget_holds_every_batch(dataset, csr):
  rng = np.random.default_rng(1)
  budget = _budget(dataset, 64, (8, 8))
  for batch in lorap_jax.iterate_node_batches(
    dataset,
    csr,
    np.arange(3000),
    64,
    (8, 8),
    budget,
    shuffle=True,
    rng=rng,
  ):
    assert int(batch.graph.n_node[0]) < budget.n_node
    assert int(batch.graph.n_edge[0]) <= budget.n_edge
  with pytest.raises(ValueError, match="exceeds the budget"):
    lorap_jax.sample_node_batch(
      dataset, csr, np.arange(64), (8, 8), _budget(dataset, 8, (8, 8)), rng
    )


def test_sampling_is_seeded(dataset, csr):
  seeds = np.arange(40)
  a, b, c = (
    lorap_jax.sample_neighborhood(csr, seeds, (2, 2), np.random.default_rng(s))
    for s in (5, 5, 6)
  )
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


def test_bad_fanouts_and_seeds_are_refused(dataset, csr):
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="fanouts"):
    lorap_jax.neighbor_budget(8, (0, 3), num_nodes=10, num_edges=10)
  with pytest.raises(ValueError, match="batch_size"):
    lorap_jax.neighbor_budget(0, (3,), num_nodes=10, num_edges=10)
  with pytest.raises(ValueError, match="distinct"):
    lorap_jax.sample_neighborhood(csr, np.array([1, 1]), (3,), rng)


def _loss_and_grad(model, params, graph, labels, mask):
  def loss_fn(p):
    logits = model.apply({"params": p}, graph, train=False)
    return steps_lib.cross_entropy_loss(logits=logits, labels=labels, mask=mask)

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize(
  "architecture",
  [
    "gcn",  # the one whose coefficients need the full graph's degrees
    pytest.param("gin", marks=pytest.mark.slow),
    pytest.param("gat", marks=pytest.mark.slow),
  ],
)
def test_complete_fanouts_give_the_full_gradient(dataset, csr, architecture):
  config = lorap_jax.get_config("csbm")
  config.quant.framework = "fp32"
  config.prompt.init = "glorot"  # a LoRAP prompt that is not a no-op
  config.model.architecture = architecture
  config.model.hidden = 16
  model = state_lib.create_model(config, num_classes=4, task="node")
  seeds = np.flatnonzero(dataset.train_mask)[:40]
  max_degree = int(np.diff(csr.indptr).max())
  fanouts = (max_degree, max_degree)
  batch = lorap_jax.sample_node_batch(
    dataset,
    csr,
    seeds,
    fanouts,
    _budget(dataset, 40, fanouts),
    np.random.default_rng(0),
  )
  full = jax.tree.map(jnp.asarray, dataset.graph)
  params = model.init(jax.random.key(0), full)["params"]
  seed_mask = np.zeros(len(dataset.labels), bool)
  seed_mask[seeds] = True
  expected = _loss_and_grad(
    model, params, full, jnp.asarray(dataset.labels), seed_mask
  )
  sampled = _loss_and_grad(
    model,
    params,
    jax.tree.map(jnp.asarray, batch.graph),
    batch.labels,
    batch.seed_mask,
  )
  assert float(sampled[0]) == pytest.approx(float(expected[0]), rel=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
    sampled[1],
    expected[1],
  )


def _csbm_config(sampler, **settings):
  config = lorap_jax.get_config("csbm")
  config.csbm.num_nodes = 2000
  config.csbm.test_fraction = 0.3
  config.train.epochs = 10
  config.train.learning_rate = 0.05
  config.model.hidden = 16
  config.train.sampler = sampler
  config.train.batch_size = 100
  config.train.fanouts = (5, 5)
  config.checkpoint.enabled = False
  for path, value in settings.items():
    section, leaf = path.split("__")
    config[section][leaf] = value
  return config


@pytest.mark.parametrize("sampler", ["full", "neighbor"])
def test_fp32_gcn_learns_a_csbm(sampler, tmp_path):
  config = _csbm_config(sampler, quant__framework="fp32", prompt__kind="none")
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  # Chance is 25%; the graph and the features each give ~80-95%.
  assert summary["test_acc_mean"] > 0.75


@pytest.mark.slow
def test_int4_lorap_neighbor_sampled_learns_a_csbm(tmp_path):
  config = _csbm_config("neighbor", train__learning_rate=0.01)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  assert summary["bits"] == 4 and summary["prompt"] == "lorap"
  assert summary["test_acc_mean"] > 0.5


def test_sampled_training_refuses_what_it_cannot_do(tmp_path):
  config = _csbm_config("neighbor", train__fanouts=(5,))
  with pytest.raises(ValueError, match="one fanout per layer"):
    lorap_jax.train_and_evaluate(config, tmp_path)
  config = _csbm_config("neighbor", quant__framework="a2q")
  with pytest.raises(ValueError, match="does not support"):
    lorap_jax.train_and_evaluate(config, tmp_path)
  config = _csbm_config("sometimes")
  with pytest.raises(ValueError, match=r"train\.sampler='sometimes'"):
    lorap_jax.train_and_evaluate(config, tmp_path)
