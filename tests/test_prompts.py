"""Tests of LoRAP, GPF, GPF-plus, the fused-prompt op and the GNN model.

References are numpy: S + softmax(S W + b) P_A P_B for LoRAP (lorap.md,
section 2), x + p for GPF and x + softmax(x A + a) P for GPF-plus.
"""

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from absl.testing import parameterized

import lorap_jax

N_NODES, D, K, R = 6, 8, 3, 2


def np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def np_lorap(s, params):
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  s = np.asarray(s, np.float64)
  alpha = np_softmax(s @ p["w_phi"] + p["b_phi"])
  return s + alpha @ p["p_a"] @ p["p_b"]


def random_lorap_params(seed, d=D, k=K, r=R):
  rng = np.random.default_rng(seed)
  shapes = {"w_phi": (d, k), "b_phi": (k,), "p_a": (k, r), "p_b": (r, d)}
  return {
    name: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    for name, shape in shapes.items()
  }


def random_matrix(seed, shape=(N_NODES, D)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def fixed_grid_requantizer(s_raw):
  """A requantize function on a fixed 4-bit grid covering `s_raw`."""
  grid = lorap_jax.affine_qparams(
    float(s_raw.min()), float(s_raw.max()), 4, signed=True
  )
  return grid, lambda t: lorap_jax.fake_quant(t, grid, gradient="identity")


# ---------------------------------------------------------------------------
# LoRAP.
# ---------------------------------------------------------------------------


class LoRAPTest(chex.TestCase):
  @parameterized.named_parameters(
    ("d8_k3_r2", 8, 3, 2),
    ("d5_k10_r4", 5, 10, 4),
    ("d16_k1_r1", 16, 1, 1),
  )
  def test_parameter_shapes_and_count(self, d, k, r):
    module = lorap_jax.LoRAP(num_prompts=k, rank=r)
    params = module.init(jax.random.key(0), jnp.ones((4, d)))["params"]
    assert jax.tree.map(jnp.shape, params) == {
      "w_phi": (d, k),
      "b_phi": (k,),
      "p_a": (k, r),
      "p_b": (r, d),
    }
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert count == lorap_jax.lorap_parameter_count(d, k, r)
    assert count == d * k + k + r * (k + d)

  def test_parameter_count_formula(self):
    # Hand-computed: 64*10 + 10 + 4*(10 + 64) = 946.
    assert lorap_jax.lorap_parameter_count(64, 10, 4) == 946
    assert lorap_jax.lorap_parameter_count(7, 10, 4) == 7 * 10 + 10 + 68

  def test_lora_init(self):
    params = lorap_jax.LoRAP(num_prompts=K, rank=R).init(
      jax.random.key(1), jnp.ones((N_NODES, D))
    )["params"]
    np.testing.assert_array_equal(np.asarray(params["p_b"]), 0.0)
    np.testing.assert_array_equal(np.asarray(params["b_phi"]), 0.0)
    assert np.abs(np.asarray(params["w_phi"])).max() > 0
    assert np.abs(np.asarray(params["p_a"])).max() > 0

  @chex.variants(with_jit=True, without_jit=True)
  def test_starts_as_a_noop(self):
    module = lorap_jax.LoRAP(num_prompts=K, rank=R)
    raw = random_matrix(2)
    variables = module.init(jax.random.key(2), jnp.asarray(raw))
    out = self.variant(module.apply)(variables, jnp.asarray(raw))
    chex.assert_shape(out, raw.shape)
    np.testing.assert_array_equal(np.asarray(out), raw)

    # With a re-quantizer: an aggregate already on the grid stays put.
    _, requantize = fixed_grid_requantizer(raw)
    s_hat = requantize(jnp.asarray(raw))
    assert np.abs(np.asarray(s_hat) - raw).max() > 1e-3  # really quantized
    out = self.variant(lambda v, s: module.apply(v, s, requantize))(
      variables, s_hat
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(s_hat))

  def test_glorot_basis_is_not_a_noop(self):
    module = lorap_jax.LoRAP(num_prompts=K, rank=R, basis_init="glorot")
    raw = jnp.asarray(random_matrix(3))
    variables = module.init(jax.random.key(3), raw)
    assert np.abs(np.asarray(variables["params"]["p_b"])).max() > 0
    out = module.apply(variables, raw)
    assert np.abs(np.asarray(out - raw)).max() > 1e-3
    want = np_lorap(raw, variables["params"])
    chex.assert_trees_all_close(out, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    module = lorap_jax.LoRAP(num_prompts=K, rank=R)
    params = random_lorap_params(4)
    s = random_matrix(5)
    out = self.variant(module.apply)({"params": params}, jnp.asarray(s))
    chex.assert_shape(out, (N_NODES, D))
    want = np_lorap(s, params)
    assert np.abs(want - s).max() > 0.1
    chex.assert_trees_all_close(out, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_requantize_is_applied_last(self):
    module = lorap_jax.LoRAP(num_prompts=K, rank=R)
    params = random_lorap_params(6)
    s = random_matrix(7)
    grid, requantize = fixed_grid_requantizer(s)
    out = self.variant(lambda p, s: module.apply({"params": p}, s, requantize))(
      params, jnp.asarray(s)
    )
    # The fixed grid has at most 16 levels.
    assert len(np.unique(np.asarray(out))) <= 16
    want = lorap_jax.fake_quant(
      jnp.asarray(np_lorap(s, params), jnp.float32), grid
    )
    chex.assert_trees_all_close(out, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_reach_all_parameters(self):
    module = lorap_jax.LoRAP(num_prompts=K, rank=R)
    params = random_lorap_params(8)
    raw = random_matrix(9)
    _, requantize = fixed_grid_requantizer(raw)
    s_hat = requantize(jnp.asarray(raw))
    cotangent = jnp.asarray(random_matrix(10))

    def loss(params):
      out = module.apply({"params": params}, s_hat, requantize)
      return jnp.sum(out * cotangent)

    def plain_loss(params):
      # The identity STE makes the re-quantizer transparent to gradients.
      alpha = jax.nn.softmax(s_hat @ params["w_phi"] + params["b_phi"][None])
      out = s_hat + alpha @ params["p_a"] @ params["p_b"]
      return jnp.sum(out * cotangent)

    grads = self.variant(jax.grad(loss))(params)
    want = jax.grad(plain_loss)(params)
    chex.assert_trees_all_equal_shapes(grads, params)
    for name in ("w_phi", "b_phi", "p_a", "p_b"):
      assert np.abs(np.asarray(grads[name])).max() > 1e-4, name
    chex.assert_trees_all_close(grads, want, atol=1e-5)

    # At the LoRA init (P_B = 0) only P_B gets a gradient at first.
    zero_b = {**params, "p_b": jnp.zeros_like(params["p_b"])}
    grads = self.variant(jax.grad(loss))(zero_b)
    for name in ("w_phi", "b_phi", "p_a"):
      np.testing.assert_array_equal(np.asarray(grads[name]), 0.0)
    assert np.abs(np.asarray(grads["p_b"])).max() > 1e-4
    chex.assert_trees_all_close(grads, jax.grad(plain_loss)(zero_b), atol=1e-5)


class PromptConfigTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("rank_zero", {"rank": 0}, r"rank=0 must be an integer >= 1"),
    ("rank_float", {"rank": 2.0}, r"rank=2.0 must be an integer >= 1"),
    (
      "num_prompts_zero",
      {"num_prompts": 0},
      r"num_prompts=0 must be an integer >= 1",
    ),
    ("unknown_kind", {"kind": "vpt"}, r"prompt='vpt' is not one of"),
    ("unknown_init", {"init": "zeros"}, r"init='zeros' is not one of"),
  )
  def test_refuses(self, kwargs, message):
    with pytest.raises(ValueError, match=message):
      lorap_jax.PromptConfig(**kwargs)

  @parameterized.named_parameters(
    ("none", "none", None, False),
    ("gpf", "gpf", "gpf", False),
    ("gpf_plus", "gpf-plus", "gpf-plus", False),
    ("lorap", "lorap", None, True),
    ("gpf_lorap", "gpf-lorap", "gpf-plus", True),
  )
  def test_kinds(self, kind, node_prompt, uses_lorap):
    config = lorap_jax.PromptConfig(kind=kind)
    assert config.node_prompt == node_prompt
    assert config.uses_lorap == uses_lorap

  def test_prompt_kinds(self):
    assert set(lorap_jax.PROMPT_KINDS) == {
      "none",
      "gpf",
      "gpf-plus",
      "lorap",
      "gpf-lorap",
    }


# ---------------------------------------------------------------------------
# GPF and GPF-plus.
# ---------------------------------------------------------------------------


class GPFTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_gpf_adds_one_vector(self):
    x = random_matrix(11)
    module = lorap_jax.GPF()
    variables = module.init(jax.random.key(5), jnp.asarray(x))
    prompt = np.asarray(variables["params"]["prompt"])
    chex.assert_shape(prompt, (D,))
    assert np.abs(prompt).max() > 0
    out = self.variant(module.apply)(variables, jnp.asarray(x))
    chex.assert_trees_all_close(out, x + prompt[None, :], atol=1e-6)
    # The same vector for every node.
    delta = np.asarray(out) - x
    chex.assert_trees_all_close(
      delta, np.tile(delta[:1], (N_NODES, 1)), atol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_gpf_plus_matches_numpy(self):
    x = random_matrix(12)
    module = lorap_jax.GPFPlus(num_prompts=K)
    variables = module.init(jax.random.key(6), jnp.asarray(x))
    params = variables["params"]
    assert jax.tree.map(jnp.shape, params) == {
      "basis": (K, D),
      "scorer": {"kernel": (D, K), "bias": (K,)},
    }
    rng = np.random.default_rng(13)
    params = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)),
      params,
    )
    out = self.variant(module.apply)({"params": params}, jnp.asarray(x))
    p = jax.tree.map(lambda t: np.asarray(t, np.float64), params)
    scores = x @ p["scorer"]["kernel"] + p["scorer"]["bias"]
    want = x + np_softmax(scores) @ p["basis"]
    chex.assert_trees_all_close(out, want, atol=1e-5)


# ---------------------------------------------------------------------------
# The fused-prompt op.
# ---------------------------------------------------------------------------


def _as_params(arrays):
  return dict(zip(("w_phi", "b_phi", "p_a", "p_b"), arrays, strict=True))


class KernelsTest(chex.TestCase):
  def _inputs(self, seed=14):
    params = random_lorap_params(seed)
    s = jnp.asarray(random_matrix(seed + 1))
    return s, params["w_phi"], params["b_phi"], params["p_a"], params["p_b"]

  @parameterized.named_parameters(
    ("w_phi", 1, (D + 1, K), r"w_phi\.shape=\(9, 3\) must be \(8, 3\)"),
    ("b_phi", 2, (K + 1,), r"b_phi\.shape=\(4,\) must be \(3,\)"),
    ("p_b", 4, (R, D - 1), r"p_b\.shape=\(2, 7\) must be \(2, 8\)"),
    ("p_a_rank", 3, (K, R + 1), r"p_b\.shape=\(2, 8\) must be \(3, 8\)"),
  )
  def test_refuses_mismatched_shapes(self, position, shape, message):
    args = list(self._inputs())
    args[position] = jnp.ones(shape)
    with pytest.raises(ValueError, match=message):
      lorap_jax.kernels.lorap_prompt(*args)

  @parameterized.named_parameters(
    ("name", "cuda", r"implementation=\['cuda'\] unknown"),
    ("sequence", ("xla", "tpu"), r"implementation=\['tpu'\] unknown"),
  )
  def test_refuses_unknown_implementation(self, implementation, message):
    available = r"; available: \('xla', 'pallas', 'triton'\) or 'auto'"
    with pytest.raises(ValueError, match=message + available):
      lorap_jax.kernels.lorap_prompt(
        *self._inputs(), implementation=implementation
      )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("default", None), ("auto", "auto"), ("xla", "xla"), ("list", ["xla"])
  )
  def test_matches_reference_and_numpy(self, implementation):
    args = self._inputs()
    out = self.variant(
      lambda *a: lorap_jax.kernels.lorap_prompt(
        *a, implementation=implementation
      )
    )(*args)
    chex.assert_shape(out, (N_NODES, D))
    reference = lorap_jax.kernels.lorap_prompt_reference(*args)
    chex.assert_trees_all_close(out, reference, atol=1e-6)
    want = np_lorap(
      args[0],
      dict(zip(("w_phi", "b_phi", "p_a", "p_b"), args[1:], strict=True)),
    )
    chex.assert_trees_all_close(out, want, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_requantizes_on_the_grid(self):
    args = self._inputs(seed=16)
    grid = lorap_jax.affine_qparams(-2.0, 2.0, 3, signed=True)
    out = self.variant(
      lambda *a: lorap_jax.kernels.lorap_prompt(
        *a, grid, rounding="half_away", gradient="clipped"
      )
    )(*args)
    want = np_lorap(
      args[0],
      dict(zip(("w_phi", "b_phi", "p_a", "p_b"), args[1:], strict=True)),
    )
    want = lorap_jax.fake_quant(
      jnp.asarray(want, jnp.float32), grid, rounding="half_away"
    )
    chex.assert_trees_all_close(out, want, atol=1e-5)
    assert len(np.unique(np.asarray(out))) <= 8

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("half_even", "half_even", [0.0, 1.0, -0.0, -1.0, 1.0, 2.0]),
    ("half_away", "half_away", [0.5, 1.0, -0.5, -1.0, 1.5, 2.0]),
  )
  def test_requantizer_rounding_mode(self, rounding, want):
    # A zero prompt (P_B = 0) and a grid of step 1/2, zero point 0: the
    # aggregate sits exactly on rounding ties k/2 + 1/4.
    ties = np.array([0.25, 0.75, -0.25, -0.75, 1.25, 1.75], np.float32)
    s_hat = jnp.asarray(np.tile(ties, (2, 1)))
    params = random_lorap_params(17, d=6)
    params["p_b"] = jnp.zeros_like(params["p_b"])
    grid = lorap_jax.affine_qparams(-4.0, 3.5, 4, signed=True)
    chex.assert_trees_all_close(
      (grid.scale, grid.zero_point), (0.5, 0.0), atol=0
    )
    out = self.variant(
      lambda s, *p: lorap_jax.kernels.lorap_prompt(
        s, *p, grid, rounding=rounding
      )
    )(s_hat, params["w_phi"], params["b_phi"], params["p_a"], params["p_b"])
    np.testing.assert_array_equal(
      np.asarray(out), np.tile(np.array(want, np.float32), (2, 1))
    )


# ---------------------------------------------------------------------------
# The GNN model.
# ---------------------------------------------------------------------------


def _path_graph(n, seed, features=5):
  pairs = [(i, i + 1) for i in range(n - 1)] + [(0, n - 1)] * (n > 2)
  senders = [s for s, r in pairs] + [r for s, r in pairs]
  receivers = [r for s, r in pairs] + [s for s, r in pairs]
  nodes = np.random.default_rng(seed).normal(size=(n, features))
  return jraph.GraphsTuple(
    nodes=nodes.astype(np.float32),
    edges=None,
    senders=np.asarray(senders, np.int32),
    receivers=np.asarray(receivers, np.int32),
    n_node=np.array([n], np.int32),
    n_edge=np.array([len(senders)], np.int32),
    globals=None,
  )


def _int32(graph):
  """jraph.batch / pad_with_graphs give int64 indices; the library's data
  pipeline casts them to int32 (see test_layers for the int64 case)."""
  cast = lambda a: jnp.asarray(np.asarray(a).astype(np.int32))
  return graph._replace(
    nodes=jnp.asarray(graph.nodes),
    senders=cast(graph.senders),
    receivers=cast(graph.receivers),
    n_node=cast(graph.n_node),
    n_edge=cast(graph.n_edge),
  )


NODE_GRAPH = _int32(_path_graph(6, seed=17))
GRAPH_BATCH = jraph.batch([_path_graph(4, seed=18), _path_graph(3, seed=19)])
PADDED_BATCH = _int32(
  jraph.pad_with_graphs(GRAPH_BATCH, n_node=10, n_edge=20, n_graph=3)
)
GRAPH_BATCH = _int32(GRAPH_BATCH)
NUM_CLASSES = 3


def _model(architecture, task, kind, quant):
  return lorap_jax.GNN(
    model=lorap_jax.ModelConfig(
      architecture=architecture,
      task=task,
      num_classes=NUM_CLASSES,
      hidden=4,
      heads=2,
      num_layers=2,
    ),
    quant=quant,
    prompt=lorap_jax.PromptConfig(kind=kind, num_prompts=3, rank=2),
  )


class PoolGraphsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("mean", "mean"), ("sum", "sum"), ("max", "max")
  )
  def test_matches_numpy(self, readout):
    # Two real graphs, one padding graph holding the padding nodes, and one
    # empty graph.
    graph = _int32(
      jraph.pad_with_graphs(GRAPH_BATCH, n_node=10, n_edge=20, n_graph=4)
    )
    rng = np.random.default_rng(20)
    nodes = rng.normal(size=(10, 3)).astype(np.float32)
    pooled = lorap_jax.pool_graphs(
      graph._replace(nodes=jnp.asarray(nodes)), readout
    )
    chex.assert_shape(pooled, (4, 3))
    np.testing.assert_array_equal(np.asarray(graph.n_node), [4, 3, 3, 0])
    bounds = np.cumsum([0, 4, 3, 3])
    want = np.zeros((4, 3), np.float32)
    for g in range(3):
      block = nodes[bounds[g] : bounds[g + 1]]
      want[g] = {"mean": np.mean, "sum": np.sum, "max": np.max}[readout](
        block, axis=0
      )
    chex.assert_trees_all_close(pooled, want, atol=1e-6)


class GNNTest(parameterized.TestCase):
  @parameterized.product(
    architecture=("gcn", "gin", "gat"),
    kind=lorap_jax.PROMPT_KINDS,
    task=("node", "graph"),
  )
  def test_builds_and_logit_shapes(self, architecture, kind, task):
    graph = NODE_GRAPH if task == "node" else PADDED_BATCH
    model = _model(architecture, task, kind, lorap_jax.QuantConfig())
    variables = model.init(jax.random.key(0), graph, bits=4.0)
    logits = model.apply(variables, graph, bits=4.0)
    n_rows = graph.nodes.shape[0] if task == "node" else 3
    chex.assert_shape(logits, (n_rows, NUM_CLASSES))
    assert np.all(np.isfinite(np.asarray(logits)))
    params = variables["params"]
    assert any(name.startswith("lorap") for name in params) == (
      kind in ("lorap", "gpf-lorap")
    )
    assert ("gpf" in params) == (kind == "gpf")
    assert ("gpf_plus" in params) == (kind in ("gpf-plus", "gpf-lorap"))
    if kind in ("lorap", "gpf-lorap"):
      # One LoRAP per message-passing layer, on that layer's aggregate width.
      for i in range(2):
        lorap = params[f"lorap_{i}"]
        d = lorap["p_b"].shape[1]
        count = sum(leaf.size for leaf in jax.tree.leaves(lorap))
        assert count == lorap_jax.lorap_parameter_count(d, 3, 2)

  @parameterized.product(
    architecture=("gcn", "gin", "gat"),
    task=("node", "graph"),
    quantized=(False, True),
  )
  def test_lorap_starts_as_a_noop(self, architecture, task, quantized):
    graph = NODE_GRAPH if task == "node" else PADDED_BATCH
    quant = lorap_jax.QuantConfig() if quantized else lorap_jax.FP32
    bits = 4.0 if quantized else None
    plain = _model(architecture, task, "none", quant)
    prompted = _model(architecture, task, "lorap", quant)
    plain_vars = plain.init(jax.random.key(1), graph, bits=bits)
    prompted_vars = prompted.init(jax.random.key(1), graph, bits=bits)
    # The backbone is initialised identically.
    backbone = {
      name: tree
      for name, tree in prompted_vars["params"].items()
      if not name.startswith("lorap")
    }
    chex.assert_trees_all_equal(backbone, plain_vars["params"])
    got = prompted.apply(prompted_vars, graph, bits=bits)
    want = plain.apply(plain_vars, graph, bits=bits)
    if jax.default_backend() == "gpu":
      # GPU scatter-adds are atomic: their summation order, and so the last
      # bit of an aggregate, differs between two programs (seen: 3e-8).
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    else:
      chex.assert_trees_all_equal(got, want)

  @parameterized.named_parameters(
    ("gcn", "gcn"), ("gin", "gin"), ("gat", "gat")
  )
  def test_padding_does_not_change_real_graphs(self, architecture):
    model = _model(architecture, "graph", "lorap", lorap_jax.FP32)
    variables = model.init(jax.random.key(2), GRAPH_BATCH)
    variables = {
      "params": jax.tree.map(
        lambda p: p + 0.1, variables["params"]
      )  # a non-trivial prompt
    }
    unpadded = model.apply(variables, GRAPH_BATCH)
    padded = model.apply(variables, PADDED_BATCH)
    chex.assert_shape(unpadded, (2, NUM_CLASSES))
    chex.assert_trees_all_close(padded[:2], unpadded, atol=1e-5)

  def test_train_mode_updates_stats(self):
    model = _model("gcn", "node", "gpf-lorap", lorap_jax.QuantConfig())
    variables = model.init(jax.random.key(3), NODE_GRAPH, bits=4.0)
    logits, updates = model.apply(
      variables,
      NODE_GRAPH,
      bits=4.0,
      train=True,
      rngs={"dropout": jax.random.key(4)},
      mutable=[lorap_jax.QUANT_STATS],
    )
    chex.assert_shape(logits, (NODE_GRAPH.nodes.shape[0], NUM_CLASSES))
    flags = [
      bool(state.initialized)
      for state in jax.tree.leaves(
        updates[lorap_jax.QUANT_STATS],
        is_leaf=lambda t: isinstance(t, lorap_jax.RangeState),
      )
    ]
    assert flags and all(flags)

  def test_quantized_model_needs_bits(self):
    model = _model("gcn", "node", "none", lorap_jax.QuantConfig())
    with pytest.raises(ValueError, match="bits must be given"):
      model.init(jax.random.key(0), NODE_GRAPH)
