"""Degree-Quant: protection probabilities, masked ranges, protected rows."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import degree_quant, layers, models
from lorap_jax._src import quant_points as qp
from lorap_jax._src import quantization as q
from lorap_jax._src import train_state as state_lib

DQ4 = qp.QuantConfig(
  calibration=q.CalibrationConfig(mode="percentile", percentile=0.01),
  gradient="clipped_inner",
  protection=degree_quant.DegreeProtection(p_min=0.1, p_max=0.2),
)


def _random_batch(rng, sizes, features=3, pad_nodes=4, pad_graphs=2):
  """A padded batch of random undirected graphs of the given sizes."""
  graphs = []
  for n in sizes:
    pairs = rng.integers(0, n, size=(2 * n, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    edges = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)
    graphs.append(
      jraph.GraphsTuple(
        nodes=rng.normal(size=(n, features)).astype(np.float32),
        edges=None,
        senders=edges[:, 0].astype(np.int32),
        receivers=edges[:, 1].astype(np.int32),
        globals=None,
        n_node=np.array([n], np.int32),
        n_edge=np.array([len(edges)], np.int32),
      )
    )
  batch = jraph.batch_np(graphs)
  n_node, n_edge = int(batch.n_node.sum()), int(batch.n_edge.sum())
  return jraph.pad_with_graphs(
    batch, n_node + pad_nodes, n_edge + 6, len(sizes) + pad_graphs
  ), graphs


def _numpy_probability(graph, p_min, p_max):
  """The reference formula, one graph at a time: p_min + spread * CDF."""
  degree = np.bincount(graph.receivers, minlength=int(graph.n_node[0]))
  cdf = np.array([np.mean(degree <= d) for d in degree])
  return p_min + (p_max - p_min) * cdf


# --- Protection probabilities ----------------------------------------------


def test_protection_probability_matches_the_formula_per_graph():
  rng = np.random.default_rng(0)
  batch, graphs = _random_batch(rng, [5, 9, 1, 14])
  protection = degree_quant.DegreeProtection(p_min=0.1, p_max=0.3)
  got = np.asarray(degree_quant.protection_probability(batch, protection))
  want = np.concatenate([_numpy_probability(g, 0.1, 0.3) for g in graphs])
  np.testing.assert_allclose(got[: len(want)], want, rtol=1e-6)
  # The padding graph's nodes get probabilities too, harmlessly in range.
  assert np.all((got >= 0.1) & (got <= 0.3 + 1e-7))


def test_one_graph_histogram_path_matches_the_sort_path():
  """A single graph (node tasks) counts degrees in a histogram instead of
  sorting; with multi-edges and isolated nodes it gives the same F."""
  rng = np.random.default_rng(3)
  n = 40
  receivers = rng.integers(0, n // 2, size=150).astype(np.int32)  # repeats
  senders = rng.integers(0, n, size=150).astype(np.int32)
  single = jraph.GraphsTuple(
    nodes=np.zeros((n, 1), np.float32),
    edges=None,
    senders=senders,
    receivers=receivers,
    globals=None,
    n_node=np.array([n], np.int32),
    n_edge=np.array([150], np.int32),
  )
  # The same graph with an empty second graph takes the sort path.
  two = single._replace(
    n_node=np.array([n, 0], np.int32), n_edge=np.array([150, 0], np.int32)
  )
  histogram = np.asarray(degree_quant.in_degree_cdf(single))
  sort = np.asarray(degree_quant.in_degree_cdf(two))
  np.testing.assert_allclose(histogram, sort, rtol=1e-6)
  degree = np.bincount(receivers, minlength=n)
  want = np.array([np.mean(degree <= d) for d in degree])
  np.testing.assert_allclose(histogram, want, rtol=1e-6)
  assert degree.max() > n // 4  # Heavy repeats: degrees well above average.


def test_packed_key_path_matches_the_pair_sort():
  """Batches sort one packed (graph, degree) key; the two-key sort it
  replaces gives the same F, with multi-edges, isolated nodes, an empty
  graph and padding."""
  rng = np.random.default_rng(4)
  batch, _ = _random_batch(rng, [7, 1, 30, 0, 12])
  # Repeated edges into graph 0's nodes: degrees far above its size (they
  # are counted with the padding graph's edges; F reads receivers only).
  heavy = rng.integers(0, 5, size=60).astype(np.int32)
  batch = batch._replace(
    senders=np.concatenate([batch.senders, heavy]),
    receivers=np.concatenate([batch.receivers, heavy]),
    n_edge=batch.n_edge + np.eye(len(batch.n_edge), dtype=np.int32)[-1] * 60,
  )
  n_nodes = batch.nodes.shape[0]
  degree = np.bincount(batch.receivers, minlength=n_nodes).astype(np.int32)
  graph_id = np.repeat(np.arange(len(batch.n_node)), batch.n_node)
  pairs = np.asarray(degree_quant._lexsorted_cdf(degree, graph_id, batch))
  packed = degree_quant._packed_key_cdf(degree, graph_id, batch)
  np.testing.assert_array_equal(np.asarray(packed), pairs)
  jitted = jax.jit(degree_quant.in_degree_cdf)(batch)
  np.testing.assert_array_equal(np.asarray(jitted), pairs)
  assert degree[:5].max() > 7  # Above graph 0's size.


def test_protection_probability_on_a_star():
  # Hub 0 with in-degree 4; leaves with in-degree 1: F = 1 and 4/5.
  senders = np.array([1, 2, 3, 4, 0, 0, 0, 0], np.int32)
  star = jraph.GraphsTuple(
    nodes=np.zeros((5, 1), np.float32),
    edges=None,
    senders=senders,
    receivers=np.array([0, 0, 0, 0, 1, 2, 3, 4], np.int32),
    globals=None,
    n_node=np.array([5], np.int32),
    n_edge=np.array([8], np.int32),
  )
  protection = degree_quant.DegreeProtection(p_min=0.0, p_max=0.1)
  got = degree_quant.protection_probability(star, protection)
  chex.assert_trees_all_close(got, jnp.array([0.1] + [0.08] * 4), rtol=1e-6)


def test_sampled_masks_follow_the_probabilities():
  probability = jnp.array([0.0, 0.1, 0.5, 1.0])
  keys = jax.random.split(jax.random.key(0), 4000)
  masks = jax.vmap(degree_quant.sample_protection, (0, None))(keys, probability)
  frequency = np.asarray(masks.mean(axis=0))
  # 4000 draws: the standard error is at most 0.008.
  np.testing.assert_allclose(frequency, probability, atol=0.03)
  assert frequency[0] == 0.0 and frequency[3] == 1.0


@pytest.mark.parametrize(("p_min", "p_max"), [(-0.1, 0.2), (0.3, 0.2), (0, 2)])
def test_impossible_probabilities_are_refused(p_min, p_max):
  with pytest.raises(ValueError, match="0 <= p_min <= p_max <= 1"):
    degree_quant.DegreeProtection(p_min=p_min, p_max=p_max)


# --- Masked ranges -----------------------------------------------------------


def _kthvalue_range(values, fraction):
  """Degree-Quant's percentile range: torch.kthvalue with its index rule."""
  ordered = np.sort(values)
  n = len(values)
  k_lo = max(1, int(n * fraction))
  k_hi = max(1, int(n * (1 - fraction)))
  return ordered[k_lo - 1], ordered[k_hi - 1]


@pytest.mark.parametrize("size", [37, 5000, 40_000])
@pytest.mark.parametrize("fraction", [0.01, 0.001])
def test_masked_percentile_matches_numpy_on_the_unmasked_subset(size, fraction):
  # 40_000 elements with 1% tails take the top_k path, 37 the full sort.
  rng = np.random.default_rng(size)
  x = rng.standard_t(3, size=size).astype(np.float32)
  mask = rng.random(size) < 0.7
  lo, hi = q.observe_percentile(jnp.asarray(x), fraction, jnp.asarray(mask))
  want = _kthvalue_range(x[mask], fraction)
  assert (float(lo), float(hi)) == (float(want[0]), float(want[1]))


def test_masked_minmax_matches_numpy_on_the_unmasked_subset():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(50, 4)).astype(np.float32)
  rows = rng.random(50) < 0.5
  lo, hi = q.observe_minmax(jnp.asarray(x), jnp.asarray(rows)[:, None])
  assert (float(lo), float(hi)) == (x[rows].min(), x[rows].max())


def test_sampled_percentile_is_exact_on_its_subset():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(300, 64)).astype(np.float32)
  mask = np.repeat(rng.random(300) < 0.8, 64).reshape(300, 64)
  lo, hi = q.observe_percentile(
    jnp.asarray(x), 0.01, jnp.asarray(mask), sample_size=4096
  )
  positions = q._sample_positions(x.size, 4096)
  kept = x.reshape(-1)[positions][mask.reshape(-1)[positions]]
  want = _kthvalue_range(kept, 0.01)
  assert (float(lo), float(hi)) == (float(want[0]), float(want[1]))
  # A 4096-element subset estimates the 1% tails closely.
  exact = _kthvalue_range(x[mask], 0.01)
  np.testing.assert_allclose((lo, hi), exact, rtol=0.15)


def test_percentile_of_nothing_is_zero_and_bad_fractions_are_refused():
  lo, hi = q.observe_percentile(jnp.ones(10), 0.01, jnp.zeros(10, bool))
  assert (float(lo), float(hi)) == (0.0, 0.0)
  with pytest.raises(ValueError, match=r"fraction=0\.5 must be in"):
    q.observe_percentile(jnp.ones(10), 0.5)


# --- Protected rows inside a layer --------------------------------------------


class _Point(layers._QuantLayer):
  """One "message" point of a layer, to test row masks in isolation."""

  @nn.compact
  def __call__(self, x, rows, train=True):
    return self.qpoint(
      "message", x, bits=jnp.asarray(4.0), train=train, rows=rows
    )


def test_protected_rows_stay_fp32_and_do_not_set_the_range():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 3)), jnp.float32)
  x = x.at[0].set(100.0)  # An outlier on a protected row.
  protected = jnp.array([True, False, False, True, False, False])
  rows = layers.node_row_masks(None, protected)
  point = _Point(quant=qp.QuantConfig(gradient="clipped"))
  variables = point.init(jax.random.key(0), x, rows)
  y, stats = point.apply(variables, x, rows, mutable=[qp.QUANT_STATS])
  chex.assert_trees_all_equal(y[protected], x[protected])
  state = stats[qp.QUANT_STATS]["message"]
  assert float(state.hi) == float(x[~protected].max())
  assert float(state.lo) == float(jnp.minimum(x[~protected].min(), 0.0))
  grid = q.affine_qparams(state.lo, state.hi, 4, signed=True)
  codes = (y[~protected] / grid.scale) + grid.zero_point
  chex.assert_trees_all_close(codes, jnp.round(codes), atol=1e-4)

  # Gradients on the stored range: identity on protected rows, the clipped
  # STE elsewhere.
  def loss(values):
    return jnp.sum(point.apply({**variables, **stats}, values, rows, False))

  grads = jax.grad(loss)(x.at[1, 0].set(1e3))
  assert float(grads[0, 0]) == 1.0  # protected, far outside the range
  assert float(grads[1, 0]) == 0.0  # unprotected and clipped
  assert float(grads[2, 0]) == 1.0


def test_padding_rows_are_not_observed():
  x = jnp.array([[1.0], [2.0], [50.0]])
  rows = layers.node_row_masks(jnp.array([True, True, False]), None)
  point = _Point(quant=qp.QuantConfig())
  variables = point.init(jax.random.key(0), x, rows)
  _, stats = point.apply(variables, x, rows, mutable=[qp.QUANT_STATS])
  assert float(stats[qp.QUANT_STATS]["message"].hi) == 2.0


# --- The model ---------------------------------------------------------------


def _gcn(quant):
  return models.GNN(
    model=models.ModelConfig(
      architecture="gcn", task="graph", num_classes=2, hidden=8
    ),
    quant=quant,
  )


def _train_forward(model, variables, graph, key):
  return model.apply(
    variables,
    graph,
    bits=jnp.asarray(4.0),
    train=True,
    rngs={"dropout": key, "protect": key},
    mutable=state_lib.MUTABLE,
  )


def test_dq_masks_depend_on_the_rng_and_eval_quantizes_every_node():
  rng = np.random.default_rng(6)
  graph, _ = _random_batch(rng, [12, 20])
  dq_model = _gcn(DQ4)
  variables = dq_model.init(jax.random.key(0), graph, bits=jnp.asarray(4.0))
  first, _ = _train_forward(dq_model, variables, graph, jax.random.key(1))
  again, _ = _train_forward(dq_model, variables, graph, jax.random.key(1))
  other, _ = _train_forward(dq_model, variables, graph, jax.random.key(2))
  chex.assert_trees_all_equal(first, again)
  assert not np.allclose(first, other)
  # Evaluation has no mask: DQ's eval is the plain model on its ranges.
  plain = _gcn(dataclasses.replace(DQ4, protection=None))
  evaluated = [
    m.apply(variables, graph, bits=jnp.asarray(4.0)) for m in (dq_model, plain)
  ]
  chex.assert_trees_all_equal(*evaluated)


def test_per_layer_masks_differ_from_a_shared_mask():
  rng = np.random.default_rng(7)
  graph, _ = _random_batch(rng, [30])
  shared = _gcn(DQ4)
  per_layer = _gcn(
    dataclasses.replace(
      DQ4,
      protection=degree_quant.DegreeProtection(
        p_min=0.1, p_max=0.2, per_layer=True
      ),
    )
  )
  variables = shared.init(jax.random.key(0), graph, bits=jnp.asarray(4.0))
  a, _ = _train_forward(shared, variables, graph, jax.random.key(3))
  b, _ = _train_forward(per_layer, variables, graph, jax.random.key(3))
  assert not np.allclose(a, b)


def test_dq_train_step_under_jit_and_vmap_over_bits(
  data_dir, mutag_first_batch
):
  config = lorap_jax.get_config("mutag")
  config.quant.framework = "dq"
  config.prompt.kind = "lorap"
  config.model.num_layers = 2
  config.model.hidden = 16
  config.data_dir = str(data_dir)
  batch = mutag_first_batch
  model = lorap_jax.create_model(config, num_classes=2, task="graph")
  state = lorap_jax.create_train_state(
    model,
    lorap_jax.create_optimizer(config),
    batch.graph,
    jax.random.key(0),
    4,
  )
  bits = jnp.array([2.0, 4.0, 8.0])
  key = jax.random.key(1)

  # The forward pass in training mode (masks, percentiles) batches exactly,
  # compiled (run op by op, it took three times as long).
  forward = jax.jit(functools.partial(forward_with_bits, model, state))
  batched = jax.jit(jax.vmap(forward, (None, None, 0)))(batch, key, bits)
  for i, b in enumerate(bits):
    chex.assert_trees_all_equal(batched[i], forward(batch, key, b))
  # The jitted step batches too. INT4 codes sit on rounding boundaries that
  # move with XLA's fusion choices, so the losses agree only loosely.
  step_batch = lorap_jax.Batch(batch.graph, batch.labels, batch.graph_mask)
  states = jax.vmap(lambda b: state.replace(bits=b))(bits)
  stepped, metrics = jax.vmap(lorap_jax.train_step, (0, None, None))(
    states, step_batch, key
  )
  losses = [
    lorap_jax.train_step(state.replace(bits=b), step_batch, key)[1]["loss"]
    for b in bits
  ]
  np.testing.assert_allclose(metrics["loss"], losses, rtol=0.1)
  assert np.all(np.isfinite(metrics["loss"]))
  # Each member trained at its own width: the losses differ.
  assert len(set(np.round(np.asarray(metrics["loss"]), 5))) == len(bits)
  assert jax.tree.leaves(stepped.params)[0].shape[0] == len(bits)


def forward_with_bits(model, state, batch, key, bits):
  return model.apply(
    state.variables(),
    batch.graph,
    bits=bits,
    train=True,
    rngs={"dropout": key, "protect": key},
    mutable=state_lib.MUTABLE,
  )[0]


# --- Config and the end-to-end run --------------------------------------------


@pytest.mark.parametrize(
  ("bits", "p_min", "p_max", "percentile"),
  [(4, 0.1, 0.2, 0.01), (8, 0.0, 0.1, 0.001)],
)
def test_dq_config_follows_the_reference_runs(bits, p_min, p_max, percentile):
  config = lorap_jax.get_config("reddit-binary")
  config.quant.framework = "dq"
  config.quant.bits = bits
  quant = state_lib.quant_config(config)
  assert quant.protection == degree_quant.DegreeProtection(
    p_min=p_min, p_max=p_max
  )
  assert quant.calibration.mode == "percentile"
  assert quant.calibration.percentile == percentile
  # GC as the reference codes it: `code >= qmax` / `code <= qmin` stop it.
  assert quant.gradient == "clipped_inner"


def test_cora_dq_trains_and_reports_its_protected_fraction(data_dir, tmp_path):
  config = lorap_jax.get_config("cora")
  config.quant.framework = "dq"
  config.prompt.kind = "none"
  config.seeds, config.train.epochs = 1, 40
  config.data_dir = str(data_dir)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  # INT4 DQ reaches ~80% on Cora (plain INT4 QAT ~76%); chance is ~30%.
  assert summary["test_acc_mean"] > 0.7
  # p in [0.1, 0.2] and the CDF is at least 1/n: a fraction inside.
  assert 0.15 < summary["dq_protected_fraction"] < 0.2


# --- GIN points per framework ------------------------------------------------


@pytest.mark.parametrize("framework", ["qat", "dq"])
def test_gin_points_are_the_reference_gins(framework):
  """Degree-Quant's GIN: no point on a layer's input, the first layer's
  first Linear in FP32, every other Linear's input quantized. (A2Q's GIN
  script places its own: `test_a2q.py`.)"""
  config = lorap_jax.get_config("mutag")
  config.quant.framework = framework
  config.model.num_layers = 2
  config.model.hidden = 8
  model = state_lib.create_model(config, num_classes=2, task="graph")
  graph, _ = _random_batch(np.random.default_rng(3), [6, 9])
  variables = model.init(jax.random.key(0), graph, bits=jnp.asarray(4.0))
  stats = variables[qp.QUANT_STATS]
  assert set(stats["conv_0"]) == {"message", "aggregate", "mlp_1", "output"}
  assert set(stats["conv_0"]["mlp_1"]) == {"input", "xw"}
  assert set(stats["conv_1"]) == {
    "message",
    "aggregate",
    "mlp_0",
    "mlp_1",
    "output",
  }
  assert set(stats["conv_1"]["mlp_0"]) == {"input", "xw"}
