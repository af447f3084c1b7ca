"""Tests of the quantized GCN, GIN and GAT layers against dense references.

Each reference is a dense-adjacency numpy computation from the layer's own
parameters: D^-1/2 (A + I) D^-1/2 X W + b for GCN, MLP((1 + eps) X + A X) for
GIN and masked softmax attention for GAT. The quantized GCN reference applies
the same fake quantization at every named point, with each point's range
taken from the tensor it quantizes (fresh statistics).
"""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from absl.testing import parameterized

import lorap_jax
from lorap_jax._src import layers
from lorap_jax._src import quantization as q_lib

N_NODES = 7
N_FEATURES = 5
# Undirected edges; node 6 is isolated (it only sees its self-loop).
UNDIRECTED = ((0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5))
BITS = 4.0
QUANT = lorap_jax.QuantConfig()


def _edges():
  senders = [s for s, r in UNDIRECTED] + [r for s, r in UNDIRECTED]
  receivers = [r for s, r in UNDIRECTED] + [s for s, r in UNDIRECTED]
  # Unsorted on purpose: aggregation must not rely on edge order.
  order = np.random.default_rng(0).permutation(len(senders))
  return (
    np.asarray(senders, np.int32)[order],
    np.asarray(receivers, np.int32)[order],
  )


def make_features(seed=0, sparsity=0.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N_NODES, N_FEATURES)).astype(np.float32)
  if sparsity:
    x = np.where(rng.random(x.shape) < sparsity, 0.0, x).astype(np.float32)
  return x


def make_graph(nodes):
  senders, receivers = _edges()
  return jraph.GraphsTuple(
    nodes=nodes
    if isinstance(nodes, lorap_jax.SparseFeatures)
    else (jnp.asarray(nodes)),
    edges=None,
    senders=jnp.asarray(senders),
    receivers=jnp.asarray(receivers),
    n_node=jnp.array([N_NODES]),
    n_edge=jnp.array([len(senders)]),
    globals=None,
  )


def dense_adjacency():
  """A[i, j] = 1 for an edge j -> i (receiver i, sender j)."""
  a = np.zeros((N_NODES, N_NODES), np.float32)
  senders, receivers = _edges()
  a[receivers, senders] = 1.0
  return a


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _randomize(params, seed, names):
  """Replaces the leaves `names` (e.g. zero-initialised biases) by randoms."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    if key in names:
      return jnp.asarray(rng.normal(size=leaf.shape).astype(np.float32))
    return leaf

  return jax.tree_util.tree_map_with_path(fill, params)


# ---------------------------------------------------------------------------
# numpy references.
# ---------------------------------------------------------------------------


def np_gcn_norm():
  """D^-1/2 (A + I) D^-1/2 with in-degrees over A + I."""
  a_hat = dense_adjacency() + np.eye(N_NODES, dtype=np.float32)
  inv_sqrt = 1.0 / np.sqrt(a_hat.sum(axis=1))
  return (inv_sqrt[:, None] * a_hat * inv_sqrt[None, :]).astype(np.float32)


def np_gcn(x, params):
  return np_gcn_norm() @ x @ params["linear"]["kernel"] + params["bias"]


def np_gin(x, params):
  relu = lambda t: np.maximum(t, 0.0)
  h = (1.0 + params["eps"]) * x + dense_adjacency() @ x
  h = relu(h @ params["mlp_0"]["kernel"] + params["mlp_0"]["bias"])
  return relu(h @ params["mlp_1"]["kernel"] + params["mlp_1"]["bias"])


def np_gat(x, params, heads, concat):
  xw = (x @ params["linear"]["kernel"]).reshape(N_NODES, heads, -1)
  src = np.sum(xw * params["att_src"][0], axis=-1)  # [n, heads]
  dst = np.sum(xw * params["att_dst"][0], axis=-1)
  logits = dst[:, None, :] + src[None, :, :]  # [receiver, sender, heads]
  logits = np.where(logits > 0, logits, 0.2 * logits)
  mask = (dense_adjacency() + np.eye(N_NODES)) > 0
  logits = np.where(mask[:, :, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(axis=1, keepdims=True))
  alpha = weights / weights.sum(axis=1, keepdims=True)
  out = np.einsum("ijh,jhf->ihf", alpha, xw)
  out = out.reshape(N_NODES, -1) if concat else out.mean(axis=1)
  return out + params["bias"]


def _grid_of(t, mask=None, bits=BITS):
  t = np.asarray(t, np.float32)
  observed = t if mask is None else t[np.broadcast_to(mask, t.shape)]
  return observed, lorap_jax.affine_qparams(
    observed.min(), observed.max(), bits, signed=True
  )


def fq(t, mask=None, bits=BITS):
  """Fake-quantizes `t` on the signed grid of its own (masked) range."""
  _, grid = _grid_of(t, mask, bits)
  return np.asarray(lorap_jax.fake_quant(jnp.asarray(t, jnp.float32), grid))


def tie_margin(t, mask=None, bits=BITS):
  """Distance of the closest code x / s + z to a rounding tie (k + 1/2).

  XLA's fused float32 division is not always correctly rounded, so a code
  within an ulp of a tie may round either way (by one step) depending on
  jit and fusion. References are compared only on inputs with a margin.
  """
  observed, grid = _grid_of(t, mask, bits)
  codes = observed / np.asarray(grid.scale) + np.asarray(grid.zero_point)
  return float(np.min(np.abs(codes - np.floor(codes) - 0.5)))


def fq_range(t, lo, hi, bits=BITS):
  grid = lorap_jax.affine_qparams(lo, hi, bits, signed=True)
  return np.asarray(lorap_jax.fake_quant(jnp.asarray(t, jnp.float32), grid))


def np_quant_gcn(x, params):
  """The quantized GCN with every point on its tensor's own range.

  Returns:
    The output [n_nodes, d] and the smallest tie margin over all points.
  """
  margins = [tie_margin(x), tie_margin(params["linear"]["kernel"])]
  xq = fq(x)
  wq = fq(params["linear"]["kernel"])
  margins.append(tie_margin(xq @ wq))
  xw = fq(xq @ wq)
  a_hat = dense_adjacency() + np.eye(N_NODES, dtype=np.float32)
  edge = (a_hat > 0)[:, :, None]  # [receiver, sender, 1]
  messages = np_gcn_norm()[:, :, None] * xw[None, :, :]  # [n, n, d]
  margins.append(tie_margin(messages, mask=edge))
  messages = np.where(edge, fq(messages, mask=edge), 0.0)
  aggregate = messages.sum(axis=1)
  margins.append(tie_margin(aggregate))
  out = fq(aggregate) + params["bias"]
  margins.append(tie_margin(out))
  return fq(out), min(margins)


# ---------------------------------------------------------------------------
# FP32 layers.
# ---------------------------------------------------------------------------


class FP32LayersTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_gcn(self):
    x = make_features()
    graph = make_graph(x)
    layer = lorap_jax.QuantGCNConv(features=3, quant=lorap_jax.FP32)
    params = layer.init(jax.random.key(0), graph)["params"]
    params = _randomize(params, 1, {"bias"})
    out = self.variant(lambda p, g: layer.apply({"params": p}, g).nodes)(
      params, graph
    )
    chex.assert_shape(out, (N_NODES, 3))
    chex.assert_trees_all_close(out, np_gcn(x, _np(params)), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gin(self):
    x = make_features()
    graph = make_graph(x)
    layer = lorap_jax.QuantGINConv(features=4, quant=lorap_jax.FP32)
    params = layer.init(jax.random.key(0), graph)["params"]
    params = _randomize(params, 2, {"eps", "mlp_0/bias", "mlp_1/bias"})
    out = self.variant(lambda p, g: layer.apply({"params": p}, g).nodes)(
      params, graph
    )
    chex.assert_shape(out, (N_NODES, 4))
    want = np_gin(x, _np(params))
    assert (want > 0).any() and (want == 0).any()  # both ReLU regimes
    chex.assert_trees_all_close(out, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("concat_two_heads", 2, True),
    ("mean_three_heads", 3, False),
  )
  def test_gat(self, heads, concat):
    x = make_features()
    graph = make_graph(x)
    layer = lorap_jax.QuantGATConv(
      features=3, heads=heads, concat=concat, quant=lorap_jax.FP32
    )
    params = layer.init(jax.random.key(0), graph)["params"]
    params = _randomize(params, 3, {"bias"})
    out = self.variant(lambda p, g: layer.apply({"params": p}, g).nodes)(
      params, graph
    )
    chex.assert_shape(out, (N_NODES, 3 * heads if concat else 3))
    want = np_gat(x, _np(params), heads, concat)
    chex.assert_trees_all_close(out, want, atol=1e-5)

  @parameterized.named_parameters(("fp32", False), ("int4", True))
  def test_gin_sparse_features_match_dense(self, quantized):
    x = make_features(seed=27, sparsity=0.6)
    sparse = lorap_jax.SparseFeatures.from_dense(x)
    quant = QUANT if quantized else lorap_jax.FP32
    bits = BITS if quantized else None
    layer = lorap_jax.QuantGINConv(features=3, quant=quant)
    variables = layer.init(jax.random.key(2), make_graph(x), bits=bits)
    dense_out = layer.apply(variables, make_graph(x), bits=bits).nodes
    sparse_out = layer.apply(variables, make_graph(sparse), bits=bits).nodes
    chex.assert_trees_all_close(sparse_out, dense_out, atol=1e-5)
    if not quantized:
      want = np_gin(x, _np(variables["params"]))
      chex.assert_trees_all_close(sparse_out, want, atol=1e-5)

  def test_gcn_normalization(self):
    senders, receivers = _edges()
    s, r = lorap_jax.add_self_loops(
      jnp.asarray(senders), jnp.asarray(receivers), N_NODES
    )
    chex.assert_shape((s, r), (len(senders) + N_NODES,))
    norm = np.asarray(lorap_jax.gcn_normalization(s, r, N_NODES))
    dense = np_gcn_norm()
    np.testing.assert_allclose(norm, dense[np.asarray(r), np.asarray(s)], 1e-6)


@pytest.mark.parametrize(
  "layer_cls", [lorap_jax.QuantGCNConv, lorap_jax.QuantGATConv]
)
def test_padded_jraph_graph_without_warnings(layer_cls):
  padded = jraph.pad_with_graphs(
    make_graph(make_features()), n_node=N_NODES + 1, n_edge=16, n_graph=2
  )
  assert padded.senders.dtype == np.int64  # what jraph hands back
  layer = layer_cls(features=2, quant=lorap_jax.FP32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    layer.init(jax.random.key(0), padded)


# ---------------------------------------------------------------------------
# Quantized GCN.
# ---------------------------------------------------------------------------


MARGIN = 1e-3


def np_quant_gin(x, params, float_first_linear):
  """Degree-Quant's quantized GIN layer, every point on its own range.

  Message x_j, aggregate sum_j x_j, then MLP((1 + eps) x_i + aggregate)
  with input, weight and product points on each Linear (none at all on the
  first Linear of the first layer), and the output point. x_i itself is
  not quantized. Returns the output and the smallest tie margin.
  """
  adjacency = dense_adjacency()
  edge = (adjacency > 0)[:, :, None]  # [receiver, sender, 1]
  messages = np.broadcast_to(x[None], (N_NODES, *x.shape))
  margins = [tie_margin(messages, mask=edge)]
  messages = np.where(edge, fq(messages, mask=edge), 0.0)
  aggregate = messages.sum(axis=1)
  margins.append(tie_margin(aggregate))
  h = (1.0 + params["eps"]) * x + fq(aggregate)
  for i in range(2):
    linear = params[f"mlp_{i}"]
    if i == 0 and float_first_linear:
      h = h @ linear["kernel"] + linear["bias"]
    else:
      margins += [tie_margin(h), tie_margin(linear["kernel"])]
      product = fq(h) @ fq(linear["kernel"])
      margins.append(tie_margin(product))
      h = fq(product) + linear["bias"]
    h = np.maximum(h, 0.0)
  margins.append(tie_margin(h))
  return fq(h), min(margins)


class _Messages(layers._QuantLayer):
  """The "message" point on x[senders], given gathered or by index."""

  @nn.compact
  def __call__(self, x, senders, rows, *, by_index, train):
    if by_index:
      return self.qpoint(
        "message", x, bits=BITS, train=train, rows=rows, index=senders
      )
    return self.qpoint(
      "message", x[senders], bits=BITS, train=train, rows=rows.gather(senders)
    )


class IndexedPointTest(chex.TestCase):
  """A point on gathered rows, quantized per row then gathered, is the point
  on the gathered copies: values and ranges bit for bit, gradients up to
  the order of their sums."""

  @parameterized.named_parameters(
    ("ema", q_lib.CalibrationConfig(mode="ema", momentum=0.01), False),
    ("percentile_kept_rows", q_lib.CalibrationConfig(mode="percentile"), True),
  )
  def test_matches_the_gathered_copies(self, calibration, keep):
    rng = np.random.default_rng(5)
    # 64 features: enough copies for the 1% percentiles to differ from the
    # minimum and maximum, and from the percentiles of the rows alone.
    x = rng.normal(size=(8, 64)).astype(np.float32)
    # Node 6 sends nothing and node 7 is padding: their extremes must not
    # reach the range.
    x[6], x[7] = 40.0, -40.0
    senders = jnp.asarray([0, 1, 1, 2, 3, 3, 3, 4, 5, 0, 7, 7], jnp.int32)
    real = jnp.arange(8) < 7
    rows = layers.RowMasks(
      observe=real & (jnp.arange(8) != 4) if keep else real,
      keep=(jnp.arange(8) == 4) if keep else None,
    )
    quant = lorap_jax.QuantConfig(calibration=calibration, gradient="clipped")
    module = _Messages(quant=quant)
    variables = module.init(
      jax.random.key(0), x, senders, rows, by_index=False, train=False
    )
    cotangent = jnp.asarray(rng.normal(size=(12, 64)), jnp.float32)

    def run(by_index, stats, xs, train):
      def loss(xs):
        out, new = module.apply(
          {**variables, lorap_jax.QUANT_STATS: stats},
          xs,
          senders,
          rows,
          by_index=by_index,
          train=train,
          mutable=[lorap_jax.QUANT_STATS],
        )
        return jnp.sum(out * cotangent), (out, new[lorap_jax.QUANT_STATS])

      (_, (out, new)), grad = jax.value_and_grad(loss, has_aux=True)(xs)
      return out, new, grad

    stats = {
      name: variables[lorap_jax.QUANT_STATS] for name in ("gathered", "index")
    }
    for step, (scale, train) in enumerate(
      ((1.0, True), (2.0, True), (3.0, False))
    ):
      xs = jnp.asarray(scale * x)
      want, stats["gathered"], want_grad = run(
        False, stats["gathered"], xs, train
      )
      got, stats["index"], grad = run(True, stats["index"], xs, train)
      chex.assert_trees_all_equal(got, want)
      chex.assert_trees_all_equal(stats["index"], stats["gathered"])
      chex.assert_trees_all_close(grad, want_grad, rtol=1e-6, atol=1e-6)
      # Clipped in the last step (evaluation on the stored range): the
      # straight-through mask is in play.
      assert step < 2 or np.asarray(grad == 0).any()
    assert float(stats["index"]["message"].hi) < 40.0


class QuantGINTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("first_layer", True), ("later", False))
  def test_matches_degree_quant_reference(self, float_first_linear):
    x = make_features(seed=33)
    graph = make_graph(x)
    layer = lorap_jax.QuantGINConv(
      features=3, quant=QUANT, float_first_linear=float_first_linear
    )
    variables = layer.init(jax.random.key(3), graph, bits=BITS)
    params = _randomize(
      variables["params"], 6, {"eps", "mlp_0/bias", "mlp_1/bias"}
    )
    variables = {**variables, "params": params}
    want, margin = np_quant_gin(x, _np(params), float_first_linear)
    assert margin > MARGIN, f"inputs too close to a rounding tie: {margin}"
    # Evaluation with fresh statistics: every point uses the batch's range.
    out = self.variant(
      lambda v, g: layer.apply(v, g, bits=BITS, train=False).nodes
    )(variables, graph)
    chex.assert_trees_all_close(out, want, atol=1e-5)
    # The points are the reference's: none on the layer input, none on a
    # float first Linear.
    stats = variables[lorap_jax.QUANT_STATS]
    assert set(stats) - {"mlp_0", "mlp_1"} == {"message", "aggregate", "output"}
    assert ("mlp_0" in stats) != float_first_linear
    assert set(stats["mlp_1"]) == {"input", "xw"}


class QuantGCNTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_dense_fake_quantized_reference(self):
    x = make_features(seed=29)
    graph = make_graph(x)
    layer = lorap_jax.QuantGCNConv(features=3, quant=QUANT)
    variables = layer.init(jax.random.key(0), graph, bits=BITS)
    params = _randomize(variables["params"], 5, {"bias"})
    variables = {**variables, "params": params}
    want, margin = np_quant_gcn(x, _np(params))
    assert margin > MARGIN, f"inputs too close to a rounding tie: {margin}"
    # Evaluation with fresh statistics: every point uses the batch's range.
    out = self.variant(
      lambda v, g: layer.apply(v, g, bits=BITS, train=False).nodes
    )(variables, graph)
    chex.assert_shape(out, (N_NODES, 3))
    chex.assert_trees_all_close(out, want, atol=1e-5)
    # The output point really quantizes: at most 2^4 levels, and the result
    # differs from the FP32 layer.
    assert len(np.unique(np.asarray(out))) <= 16
    assert np.abs(np.asarray(out) - np_gcn(x, _np(params))).max() > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_init_output_matches_reference(self):
    x = make_features(seed=14)
    graph = make_graph(x)
    layer = lorap_jax.QuantGCNConv(features=3, quant=QUANT)
    out, variables = self.variant(
      lambda k, g: layer.init_with_output(k, g, bits=BITS)
    )(jax.random.key(0), graph)
    want, margin = np_quant_gcn(x, _np(variables["params"]))
    assert margin > MARGIN, f"inputs too close to a rounding tie: {margin}"
    chex.assert_trees_all_close(out.nodes, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("fp32", False), ("int4", True))
  def test_sparse_features_match_dense(self, quantized):
    x = make_features(seed=27, sparsity=0.6)
    assert (x == 0).mean() > 0.3
    sparse = lorap_jax.SparseFeatures.from_dense(x)
    np.testing.assert_array_equal(np.asarray(sparse.to_dense()), x)
    quant = QUANT if quantized else lorap_jax.FP32
    bits = BITS if quantized else None
    for layer in (
      lorap_jax.QuantGCNConv(features=3, quant=quant),
      lorap_jax.QuantGATConv(features=2, heads=2, quant=quant),
    ):
      variables = layer.init(jax.random.key(2), make_graph(x), bits=bits)
      run = self.variant(
        lambda v, g, layer=layer: layer.apply(v, g, bits=bits).nodes
      )
      dense_out = run(variables, make_graph(x))
      sparse_out = run(variables, make_graph(sparse))
      chex.assert_trees_all_close(sparse_out, dense_out, atol=1e-5)
      if isinstance(layer, lorap_jax.QuantGCNConv):
        params = _np(variables["params"])
        if quantized:
          want, margin = np_quant_gcn(x, params)
          assert margin > MARGIN, f"too close to a rounding tie: {margin}"
        else:
          want = np_gcn(x, params)
        chex.assert_trees_all_close(sparse_out, want, atol=1e-5)


def _sparse_matrix(row_counts, n_features=40, seed=0):
  """A dense matrix with exactly `row_counts[i]` non-zeros in row i."""
  rng = np.random.default_rng(seed)
  x = np.zeros((len(row_counts), n_features), np.float32)
  for i, count in enumerate(row_counts):
    columns = rng.choice(n_features, size=count, replace=False)
    x[i, columns] = rng.normal(size=count)
  return x


def test_row_slots_index_each_rows_non_zeros_in_order():
  x = _sparse_matrix([3, 0, 1, 2])
  sparse = lorap_jax.SparseFeatures.from_dense(x)
  nnz = sparse.values.shape[0]
  # Row 0 owns entries 0..2, row 1 none, row 2 entry 3, row 3 entries 4, 5;
  # the rest point one past the end (nnz).
  np.testing.assert_array_equal(
    sparse.row_slots,
    [[0, 1, 2], [nnz, nnz, nnz], [3, nnz, nnz], [4, 5, nnz]],
  )


def test_rows_beyond_the_slot_limit_keep_the_coo_form():
  x = _sparse_matrix(
    [layers.MAX_ROW_SLOTS + 1, 2], n_features=layers.MAX_ROW_SLOTS + 8
  )
  sparse = lorap_jax.SparseFeatures.from_dense(x)
  assert sparse.row_slots is None
  w = np.random.default_rng(1).normal(size=(x.shape[1], 3)).astype(np.float32)
  out = jax.jit(layers.matmul)(sparse, jnp.asarray(w))
  np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_row_slot_matmul_matches_coo_and_dense_with_gradients(use_jit):
  """Values and gradients (of w and of the non-zeros, which A2Q-style
  learned input steps would need) of the row-slot product against the COO
  scatter and the dense product."""
  x = _sparse_matrix([5, 0, 1, 7, 3, 2, 9, 4])
  slotted = lorap_jax.SparseFeatures.from_dense(x)
  assert slotted.row_slots.shape == (8, 9)
  coo = slotted.replace(row_slots=None)
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(x.shape[1], 6)).astype(np.float32))
  cotangent = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))

  def loss(values, w, sparse):
    out = layers.matmul(sparse.replace_values(values), w)
    return jnp.sum(out * cotangent), out

  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  if use_jit:
    grad = jax.jit(grad)
  (values_grad, w_grad), out = grad(slotted.values, w, slotted)
  (coo_values_grad, coo_w_grad), coo_out = grad(coo.values, w, coo)
  np.testing.assert_allclose(out, x @ np.asarray(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, coo_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_grad, coo_w_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    w_grad, x.T @ np.asarray(cotangent), rtol=1e-5, atol=1e-5
  )
  rows, cols = np.nonzero(x)
  want_values_grad = np.sum(
    np.asarray(w)[cols] * np.asarray(cotangent)[rows], axis=1
  )
  np.testing.assert_allclose(values_grad, coo_values_grad, rtol=1e-5)
  np.testing.assert_allclose(
    values_grad, want_values_grad, rtol=1e-5, atol=1e-6
  )


# ---------------------------------------------------------------------------
# Calibration state: updated in training, frozen in evaluation.
# ---------------------------------------------------------------------------


def _initialized_flags(stats):
  return [
    bool(leaf.initialized)
    for leaf in jax.tree.leaves(
      stats, is_leaf=lambda t: isinstance(t, lorap_jax.RangeState)
    )
  ]


class QuantStatsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_layer_train_then_eval(self):
    x1 = make_features(seed=8)
    x2 = 3.0 * make_features(seed=9)
    x3 = 5.0 * make_features(seed=10)
    layer = lorap_jax.QuantDense(features=3, quant=QUANT)
    variables = layer.init(jax.random.key(3), jnp.asarray(x1), bits=BITS)
    params = _randomize(variables["params"], 11, {"bias"})
    stats = variables[lorap_jax.QUANT_STATS]
    assert set(stats) == {"input", "xw"}  # weights need no state
    assert not any(_initialized_flags(stats))
    kernel, bias = (np.asarray(params["kernel"]), np.asarray(params["bias"]))
    wq = fq(kernel)

    def step(stats, x, train):
      return layer.apply(
        {"params": params, lorap_jax.QUANT_STATS: stats},
        x,
        bits=BITS,
        train=train,
        mutable=[lorap_jax.QUANT_STATS],
      )

    step = self.variant(step, static_argnums=2)

    # First training batch: the stored range is the batch's min/max.
    out1, new = step(stats, jnp.asarray(x1), True)
    stats1 = new[lorap_jax.QUANT_STATS]
    assert all(_initialized_flags(stats1))
    chex.assert_trees_all_close(
      (stats1["input"].lo, stats1["input"].hi), (x1.min(), x1.max()), atol=0
    )
    xw1 = fq(x1) @ wq
    chex.assert_trees_all_close(
      (stats1["xw"].lo, stats1["xw"].hi), (xw1.min(), xw1.max()), atol=1e-5
    )
    chex.assert_trees_all_close(out1, fq(xw1) + bias, atol=1e-5)

    # Second training batch: EMA with momentum 0.01, then quantize on it.
    out2, new = step(stats1, jnp.asarray(x2), True)
    stats2 = new[lorap_jax.QUANT_STATS]
    ema = lambda old, cur: old + 0.01 * (cur - old)
    in_lo, in_hi = ema(x1.min(), x2.min()), ema(x1.max(), x2.max())
    chex.assert_trees_all_close(
      (stats2["input"].lo, stats2["input"].hi), (in_lo, in_hi), atol=1e-6
    )
    xw2 = fq_range(x2, in_lo, in_hi) @ wq
    xw_lo, xw_hi = ema(xw1.min(), xw2.min()), ema(xw1.max(), xw2.max())
    chex.assert_trees_all_close(
      out2, fq_range(xw2, xw_lo, xw_hi) + bias, atol=1e-5
    )

    # Evaluation: the stored ranges are used as they are, and not updated.
    out3, new = step(stats2, jnp.asarray(x3), False)
    chex.assert_trees_all_close(new[lorap_jax.QUANT_STATS], stats2, atol=0)
    xw3 = fq_range(x3, in_lo, in_hi) @ wq
    want3 = fq_range(xw3, stats2["xw"].lo, stats2["xw"].hi) + bias
    chex.assert_trees_all_close(out3, want3, atol=1e-5)
    # x3 is wider than the stored range, so evaluation clips it.
    assert np.abs(np.asarray(out3) - (fq(fq(x3) @ wq) + bias)).max() > 1e-2

  @chex.variants(with_jit=True, without_jit=True)
  def test_evaluation_before_any_calibration_uses_the_batch_range(self):
    # Decided in Python outside jit, by a cond inside: the same numbers.
    x = 3.0 * make_features(seed=13)
    layer = lorap_jax.QuantDense(features=3, quant=QUANT)
    variables = layer.init(jax.random.key(5), jnp.asarray(x), bits=BITS)
    params = _randomize(variables["params"], 14, {"bias"})
    assert not any(_initialized_flags(variables[lorap_jax.QUANT_STATS]))

    @self.variant
    def evaluate(variables, x):  # Traced under jit: the flag too.
      return layer.apply(variables, x, bits=BITS)

    got = evaluate({**variables, "params": params}, jnp.asarray(x))
    xw = fq(x) @ fq(np.asarray(params["kernel"]))
    want = fq(xw) + np.asarray(params["bias"])
    chex.assert_trees_all_close(got, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gcn_points_update_in_train_only(self):
    graph = make_graph(make_features(seed=12))
    layer = lorap_jax.QuantGCNConv(features=3, quant=QUANT)
    variables = layer.init(jax.random.key(4), graph, bits=BITS)
    stats = variables[lorap_jax.QUANT_STATS]
    assert set(stats) == {"linear", "message", "aggregate", "output"}
    assert set(stats["linear"]) == {"input", "xw"}

    def run(v, g, train):
      return layer.apply(
        v, g, bits=BITS, train=train, mutable=[lorap_jax.QUANT_STATS]
      )[1][lorap_jax.QUANT_STATS]

    run = self.variant(run, static_argnums=2)
    trained = run(variables, graph, True)
    assert all(_initialized_flags(trained))
    assert len(_initialized_flags(trained)) == 5
    evaluated = run(variables, graph, False)
    chex.assert_trees_all_close(evaluated, stats, atol=0)
    frozen = run({**variables, lorap_jax.QUANT_STATS: trained}, graph, False)
    chex.assert_trees_all_close(frozen, trained, atol=0)
    # The node features' range is what the input point stored.
    x = np.asarray(graph.nodes)
    chex.assert_trees_all_close(
      (trained["linear"]["input"].lo, trained["linear"]["input"].hi),
      (x.min(), x.max()),
      atol=0,
    )

  def test_fp32_layer_has_no_stats(self):
    graph = make_graph(make_features())
    variables = lorap_jax.QuantGCNConv(features=3).init(
      jax.random.key(0), graph
    )
    assert set(variables) == {"params"}


# ---------------------------------------------------------------------------
# segment_softmax.
# ---------------------------------------------------------------------------


class SegmentSoftmaxTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_and_sums_to_one(self):
    rng = np.random.default_rng(13)
    segments = np.array([0, 2, 2, 0, 3, 2, 0, 3, 3, 3], np.int32)  # 1 empty
    logits = rng.normal(size=(10, 2)).astype(np.float32) * 3
    logits[4, 0] = 1000.0  # would overflow a naive exp
    alpha = self.variant(lambda x, s: lorap_jax.segment_softmax(x, s, 4))(
      jnp.asarray(logits), jnp.asarray(segments)
    )
    chex.assert_shape(alpha, (10, 2))
    assert np.all(np.isfinite(np.asarray(alpha)))
    totals = jax.ops.segment_sum(alpha, jnp.asarray(segments), 4)
    chex.assert_trees_all_close(
      totals, np.array([[1, 1], [0, 0], [1, 1], [1, 1]], np.float32), atol=1e-6
    )
    want = np.zeros_like(logits)
    for seg in (0, 2, 3):
      rows = segments == seg
      shifted = logits[rows] - logits[rows].max(axis=0)
      want[rows] = np.exp(shifted) / np.exp(shifted).sum(axis=0)
    chex.assert_trees_all_close(alpha, want, atol=1e-6)


@pytest.mark.parametrize("broadcast_dims", [(), (1,)])
def test_dropout_matches_flax_dropout_and_its_gradient(broadcast_dims):
  """`layers.Dropout` (its mask materialised once) gives `nn.Dropout`'s
  output and gradient bit for bit, for the same random stream."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(50, 8)), jnp.float32)

  def run(module_class, x):
    module = module_class(0.4, broadcast_dims=broadcast_dims)
    return module.apply({}, x, deterministic=False, rngs={"dropout": key})

  key = jax.random.key(3)
  for fn in (run, jax.grad(lambda m, x: jnp.sum(run(m, x) ** 2), argnums=1)):
    ours = jax.jit(fn, static_argnums=0)(layers.Dropout, x)
    want = jax.jit(fn, static_argnums=0)(nn.Dropout, x)
    np.testing.assert_array_equal(ours, want)
  assert 0 < float(jnp.mean(run(layers.Dropout, x) == 0)) < 1
  np.testing.assert_array_equal(
    layers.Dropout(0.4).apply({}, x, deterministic=True), x
  )
