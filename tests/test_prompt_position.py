"""Tests of where LoRAP acts: after aggregation ("post") or before ("pre").

The numpy reference of a 2-layer FP32 node GCN with LoRAP is
  post: h' = relu?(L(A_hat h W) + b),   pre: h' = relu?(A_hat L(h) W + b),
with L(s) = s + softmax(s W_phi + b_phi) P_A P_B and A_hat the symmetric
normalisation of A + I.
"""

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from absl.testing import parameterized

import lorap_jax

N_NODES, FEATURES, HIDDEN, CLASSES = 7, 5, 6, 3


def _graph():
  pairs = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (0, 3), (0, 5)]
  senders = [s for s, r in pairs] + [r for s, r in pairs]
  receivers = [r for s, r in pairs] + [s for s, r in pairs]
  nodes = np.random.default_rng(0).normal(size=(N_NODES, FEATURES))
  return jraph.GraphsTuple(
    nodes=jnp.asarray(nodes, jnp.float32),
    edges=None,
    senders=jnp.asarray(senders, jnp.int32),
    receivers=jnp.asarray(receivers, jnp.int32),
    n_node=jnp.asarray([N_NODES], jnp.int32),
    n_edge=jnp.asarray([len(senders)], jnp.int32),
    globals=None,
  )


GRAPH = _graph()


def _model(position, quant=lorap_jax.FP32, kind="lorap", init="lora"):
  return lorap_jax.GNN(
    model=lorap_jax.ModelConfig(
      architecture="gcn",
      task="node",
      num_classes=CLASSES,
      hidden=HIDDEN,
      num_layers=2,
    ),
    quant=quant,
    prompt=lorap_jax.PromptConfig(
      kind=kind, num_prompts=3, rank=2, init=init, position=position
    ),
  )


def _a_hat(graph) -> np.ndarray:
  a = np.eye(N_NODES)
  for s, r in zip(
    np.asarray(graph.senders), np.asarray(graph.receivers), strict=True
  ):
    a[r, s] += 1.0
  inv_sqrt = 1.0 / np.sqrt(a.sum(axis=1))
  return inv_sqrt[:, None] * a * inv_sqrt[None, :]


def _np_lorap(s, p):
  z = s @ np.asarray(p["w_phi"], np.float64) + np.asarray(p["b_phi"])
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  alpha = z / z.sum(axis=-1, keepdims=True)
  return s + alpha @ np.asarray(p["p_a"], np.float64) @ np.asarray(p["p_b"])


def _np_forward(params, position) -> np.ndarray:
  a_hat = _a_hat(GRAPH)
  h = np.asarray(GRAPH.nodes, np.float64)
  for i in range(2):
    conv = params[f"conv_{i}"]
    if position == "pre":
      h = _np_lorap(h, params[f"lorap_{i}"])
    s = a_hat @ (h @ np.asarray(conv["linear"]["kernel"], np.float64))
    if position == "post":
      s = _np_lorap(s, params[f"lorap_{i}"])
    h = s + np.asarray(conv["bias"])
    if i == 0:
      h = np.maximum(h, 0.0)
  return h


def _nonzero_params(variables):
  # Move every parameter off its init, so the prompt is not a no-op.
  leaves, treedef = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(1)
  moved = [
    leaf + 0.3 * jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)
    for leaf in leaves
  ]
  return {**variables, "params": jax.tree.unflatten(treedef, moved)}


class PromptPositionTest(parameterized.TestCase):
  def test_refuses_unknown_position(self):
    with pytest.raises(ValueError, match=r"position='mid' is not one of"):
      lorap_jax.PromptConfig(kind="lorap", position="mid")
    config = lorap_jax.get_config("cora")
    config.prompt.position = "before"
    with pytest.raises(ValueError, match=r"position='before' is not one of"):
      lorap_jax.create_model(config, num_classes=7, task="node")

  def test_default_is_post(self):
    assert lorap_jax.PromptConfig().position == "post"
    assert lorap_jax.get_config("cora").prompt.position == "post"
    model = lorap_jax.create_model(
      lorap_jax.get_config("cora"), num_classes=7, task="node"
    )
    assert model.prompt.position == "post"

  @parameterized.named_parameters(("post", "post"), ("pre", "pre"))
  def test_fp32_matches_numpy(self, position):
    model = _model(position)
    variables = _nonzero_params(model.init(jax.random.key(0), GRAPH))
    # Post: LoRAP on the aggregate widths; pre: on the layer input widths.
    widths = (HIDDEN, CLASSES) if position == "post" else (FEATURES, HIDDEN)
    for i, width in enumerate(widths):
      chex.assert_shape(variables["params"][f"lorap_{i}"]["p_b"], (2, width))
    assert model.aggregate_widths(FEATURES) == widths
    got = model.apply(variables, GRAPH)
    want = _np_forward(variables["params"], position)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # The moved prompt does act: without it the output differs.
    unprompted = _np_forward(variables["params"], "none")
    assert np.abs(want - unprompted).max() > 1e-2

  def test_pre_is_the_layer_on_the_prompted_input(self):
    # Quantized, with calibrated ranges and moved prompt parameters: each
    # layer of the "pre" model is the unprompted quantized layer applied to
    # the prompted input.
    quant = lorap_jax.QuantConfig()
    model = _model("pre", quant)
    variables = _nonzero_params(model.init(jax.random.key(2), GRAPH, bits=4.0))
    _, updates = model.apply(
      variables,
      GRAPH,
      bits=4.0,
      train=True,
      rngs={"dropout": jax.random.key(3)},
      mutable=[lorap_jax.QUANT_STATS],
    )
    variables = {**variables, **updates}
    got = model.apply(variables, GRAPH, bits=4.0)
    params, stats = variables["params"], variables[lorap_jax.QUANT_STATS]
    h = GRAPH.nodes
    for i, width in enumerate((HIDDEN, CLASSES)):
      prompted = lorap_jax.LoRAP(num_prompts=3, rank=2).apply(
        {"params": params[f"lorap_{i}"]}, h
      )
      conv = lorap_jax.QuantGCNConv(features=width, quant=quant)
      h = conv.apply(
        {
          "params": params[f"conv_{i}"],
          lorap_jax.QUANT_STATS: stats[f"conv_{i}"],
        },
        GRAPH._replace(nodes=prompted),
        bits=4.0,
      ).nodes
      if i == 0:
        h = jax.nn.relu(h)
    chex.assert_trees_all_equal(got, h)

  @parameterized.named_parameters(("post", "post"), ("pre", "pre"))
  def test_lora_init_is_a_noop(self, position):
    quant = lorap_jax.QuantConfig()
    plain = _model(position, quant, kind="none")
    prompted = _model(position, quant)
    # On the CPU: a GPU may run x @ (W + A @ B) and x @ W through different
    # GEMM kernels, whose last-bit differences the INT4 quantizers round into
    # whole steps (seen on an H200). The identity itself is exact.
    with jax.default_device(jax.devices("cpu")[0]):
      plain_vars = plain.init(jax.random.key(4), GRAPH, bits=4.0)
      prompted_vars = prompted.init(jax.random.key(4), GRAPH, bits=4.0)
      chex.assert_trees_all_equal(
        prompted.apply(prompted_vars, GRAPH, bits=4.0),
        plain.apply(plain_vars, GRAPH, bits=4.0),
      )

  def test_aggregate_is_sown_after_the_prompt(self):
    model = _model("post")
    variables = _nonzero_params(model.init(jax.random.key(5), GRAPH))
    _, sown = model.apply(variables, GRAPH, mutable=[lorap_jax.INTERMEDIATES])
    params = variables["params"]
    a_hat = _a_hat(GRAPH)
    h = np.asarray(GRAPH.nodes, np.float64)
    kernel = np.asarray(params["conv_0"]["linear"]["kernel"], np.float64)
    want = _np_lorap(a_hat @ (h @ kernel), params["lorap_0"])
    (got,) = sown[lorap_jax.INTERMEDIATES]["conv_0"]["aggregate"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Without the collection mutable nothing is sown (training's path).
    assert not isinstance(model.apply(variables, GRAPH), tuple)

  def test_integer_export_refuses_pre(self):
    model = _model("pre", lorap_jax.QuantConfig())
    variables = model.init(jax.random.key(6), GRAPH, bits=4.0)
    with pytest.raises(ValueError, match=r"position='pre'"):
      lorap_jax.export_integer_model(variables, model=model, bits=4)
