"""MixQ: the relaxed mixture, its quantizer and gradients, the selection."""

import json

import chex
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
import pytest

import lorap_jax
from lorap_jax._src import mixq
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib


def _numpy_fake_quantize(x, scale, zero, bits):
  qmin, qmax = (
    (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  )
  codes = np.round(np.clip(zero + x / scale, qmin, qmax))
  return scale * (codes - zero)


@pytest.fixture
def activations():
  return np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)


def test_calibration_and_forward_follow_the_reference(activations):
  x = activations
  scale, zero = mixq.calibrate(jnp.asarray(x), 4, axes=(0,))
  lo = np.minimum(x.min(0, keepdims=True), 0)
  hi = np.maximum(x.max(0, keepdims=True), 0)
  want_scale = (hi - lo) / 15 + 1e-16
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  np.testing.assert_allclose(zero, np.round(7 - hi / want_scale))
  got = mixq.fake_quantize(jnp.asarray(x), scale, zero, 4)
  want = _numpy_fake_quantize(x, np.asarray(scale), np.asarray(zero), 4)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Calibrated on x itself, every value is within half a step.
  assert np.all(np.abs(np.asarray(got) - x) <= np.asarray(scale) / 2 + 1e-6)


def test_one_bit_range_is_minus_one_to_one():
  assert mixq.integer_range(1) == (-1.0, 1.0)
  assert mixq.integer_range(4) == (-8.0, 7.0)


def test_an_array_width_quantizes_as_the_integer_width(activations):
  widths = np.arange(1, 17)
  lo, hi = jax.jit(mixq.integer_range)(jnp.asarray(widths))
  for i, bits in enumerate(widths):
    assert (lo[i], hi[i]) == mixq.integer_range(int(bits))
  x = jnp.asarray(activations)
  scale, zero = mixq.calibrate(x, 3, axes=(0,))

  def quantized(values, s, z, bits):
    return jnp.sum(jnp.sin(mixq.fake_quantize(values, s, z, bits)))

  # Both compiled (eager means sum in another order): the int a constant.
  gradient = jax.value_and_grad(quantized, (0, 1, 2))
  by_int = jax.jit(gradient, static_argnums=3)(x, scale, zero, 3)
  by_array = jax.jit(gradient)(x, scale, zero, jnp.int32(3))
  chex.assert_trees_all_equal(by_array, by_int)


def test_custom_gradients(activations):
  x = jnp.asarray(activations)
  scale = jnp.full((1, 5), 0.2)
  zero = jnp.full((1, 5), 1.0)
  upstream = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))

  def loss(values, s, z):
    return jnp.sum(upstream * mixq.fake_quantize(values, s, z, 3))

  grad_x, grad_s, grad_z = jax.grad(loss, (0, 1, 2))(x, scale, zero)
  shifted = np.asarray(zero + x / scale)
  inside = (shifted >= -4) & (shifted <= 3)
  g = np.asarray(upstream)
  np.testing.assert_allclose(grad_x, g * inside)
  np.testing.assert_allclose(
    grad_s, (g * np.asarray(x / scale)).mean(0, keepdims=True), rtol=1e-5
  )
  np.testing.assert_allclose(grad_z, g.mean(0, keepdims=True), rtol=1e-5)
  # A per-tensor scale gets the column means summed.
  grad_scalar = jax.grad(loss, 1)(x, jnp.full((1, 1), 0.2), zero)
  np.testing.assert_allclose(
    grad_scalar, np.sum(np.asarray(grad_s), keepdims=True), rtol=1e-5
  )


class _Point(nn.Module):
  config: mixq.MixQConfig
  name_of_point: str = "xw"

  @nn.compact
  def __call__(self, x):
    return mixq.quantize_point(self, self.name_of_point, x, config=self.config)


def test_relaxed_mixture_weights_and_penalty(activations):
  config = mixq.MixQConfig(candidates=(2, 4, 8), memory_weight=0.5)
  point = _Point(config)
  x = jnp.asarray(activations)
  params = point.init(jax.random.key(0), x)["params"]
  logits = params["mixq_xw_logits"]
  np.testing.assert_allclose(
    logits, jax.nn.softmax(jax.nn.softmax(jnp.array([2.0, 4.0, 8.0])))
  )
  params = {**params, "mixq_xw_logits": jnp.array([0.3, -1.0, 2.0])}
  y, sown = point.apply({"params": params}, x, mutable=[mixq.EXPECTED_MEMORY])
  weights = jax.nn.softmax(jnp.array([0.3, -1.0, 2.0]))
  want = sum(
    weights[k]
    * mixq.fake_quantize(
      x, params["mixq_xw_scale"][k], params["mixq_xw_zero"][k], b
    )
    for k, b in enumerate((2, 4, 8))
  )
  chex.assert_trees_all_close(y, want, rtol=1e-6)
  expected_kb = float(jnp.sum(weights * jnp.array([2.0, 4.0, 8.0]))) * 80 / 8192
  (memory,) = sown[mixq.EXPECTED_MEMORY]["xw"]
  np.testing.assert_allclose(memory, expected_kb, rtol=1e-6)
  np.testing.assert_allclose(
    mixq.memory_penalty(memory, config), 0.5 * expected_kb, rtol=1e-6
  )
  # The argmax of softmax(alpha) wins.
  assert mixq.selected_widths(params, config) == {"xw": 8}


class _ObservedPoint(nn.Module):
  config: mixq.MixQConfig

  @nn.compact
  def __call__(self, x, observe):
    return mixq.quantize_point(
      self, "aggregate", x, config=self.config, observe=observe
    )


def test_padding_rows_do_not_set_the_calibrated_range(activations):
  """A batch's filler node sums every padding edge; with a node prompt its
  aggregate dwarfs the real rows', and a range calibrated on it rounded the
  real values to a few codes (MUTAG MixQ + GPF collapsed to 2 bits)."""
  config = mixq.MixQConfig(candidates=(2, 8))
  real = jnp.asarray(activations)
  padded = jnp.concatenate([real, jnp.full((2, real.shape[1]), 500.0)])
  observe = jnp.arange(padded.shape[0]) < real.shape[0]
  point = _ObservedPoint(config)
  params = point.init(jax.random.key(0), padded, observe)["params"]
  alone = _Point(config, name_of_point="aggregate")
  want = alone.init(jax.random.key(0), real)["params"]
  for field in ("scale", "zero"):
    key = f"mixq_aggregate_{field}"
    np.testing.assert_allclose(params[key], want[key], rtol=1e-6)
  # The real rows quantize as if the padding were not there.
  y = point.apply({"params": params}, padded, observe)
  np.testing.assert_allclose(
    y[: real.shape[0]], alone.apply({"params": want}, real), rtol=1e-6
  )


def test_weight_copies_start_equal_and_train_apart():
  config = mixq.MixQConfig(candidates=(2, 8))
  point = _Point(config, name_of_point="weight")
  kernel = jnp.asarray(
    np.random.default_rng(2).normal(size=(4, 3)), jnp.float32
  )
  params = point.init(jax.random.key(0), kernel)["params"]
  chex.assert_trees_all_equal(params["mixq_weight_copies"][0], kernel)

  def loss(p):
    return jnp.sum(point.apply({"params": p}, kernel) ** 2)

  grads = jax.grad(loss)(params)
  # Each copy's gradient is scaled by its own mixture weight.
  assert grads["mixq_weight_copies"].shape == (1, 4, 3)
  assert np.any(np.asarray(grads["mixq_weight_copies"]) != 0)


def test_fixed_widths_and_missing_components():
  config = mixq.MixQConfig(selected=(("conv_0/linear/xw", 4),))
  assert config.widths("conv_0/linear/xw") == (4,)
  with pytest.raises(ValueError, match="no selected width for the MixQ"):
    config.widths("conv_1/linear/xw")
  with pytest.raises(ValueError, match=r"candidates=.* must be integers"):
    mixq.MixQConfig(candidates=(0, 4))
  with pytest.raises(ValueError, match="granularity='row'"):
    mixq.MixQConfig(granularity="row")


def test_every_selection_lowers_to_one_program(mutag_first_batch):
  """The fixed stage stores its widths as state: two folds' selections
  lower to the same train-step program, which the compilation cache then
  compiles once, and each still trains at its own widths."""
  config = lorap_jax.get_config("mutag")
  config.quant.framework, config.prompt.kind = "mixq", "lorap"
  config.model.num_layers, config.model.hidden = 2, 16
  batch = mutag_first_batch
  search = lorap_jax.create_model(config, num_classes=2, task="graph")
  init = jax.jit(search.init, static_argnames="train")  # Eagerly: 7 s.
  variables = init(jax.random.key(0), batch.graph, bits=4.0, train=False)
  components = mixq.selected_widths(variables["params"], search.quant.mixq)
  programs, losses = [], []
  for width in (2, 8):
    config.mixq.selected = ",".join(f"{c}={width}" for c in components)
    model = lorap_jax.create_model(config, num_classes=2, task="graph")
    state = state_lib.create_train_state(
      model, optax.adam(1e-3), batch.graph, jax.random.key(0), 4.0
    )
    stored = flax.traverse_util.flatten_dict(state.quant_stats)
    assert {int(v) for k, v in stored.items() if k[-1].endswith("_bits")} == {
      width
    }
    step_batch = lorap_jax.Batch(batch.graph, batch.labels, batch.graph_mask)
    programs.append(
      steps_lib.train_step.lower(state, step_batch, jax.random.key(1)).as_text()
    )
    losses.append(steps_lib.train_step(state, step_batch, jax.random.key(1))[1])
  assert programs[0] == programs[1]
  assert losses[0]["loss"] != losses[1]["loss"]


def test_mixture_under_jit_and_vmap(activations):
  config = mixq.MixQConfig()
  point = _Point(config)
  x = jnp.asarray(activations)
  params = point.init(jax.random.key(0), x)["params"]
  many = jnp.array([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.1, 0.2, 0.3]])

  def forward(logits):
    return point.apply({"params": {**params, "mixq_xw_logits": logits}}, x)

  batched = jax.jit(jax.vmap(forward))(many)
  for i in range(3):
    chex.assert_trees_all_close(batched[i], forward(many[i]), rtol=1e-6)


def test_bit_operations_weigh_each_module_by_its_widths():
  operations = {
    "conv_0": {"linear": {"matmul": (100,)}, "aggregate": (10,)},
    "conv_1": {"linear": {"matmul": (50,)}, "aggregate": (5,)},
  }
  selected = {
    "conv_0/linear/input": 8,
    "conv_0/linear/weight": 4,
    "conv_0/linear/xw": 6,
    "conv_0/aggregate": 2,
    "conv_1/linear/weight": 8,
    "conv_1/linear/xw": 8,
    "conv_1/aggregate": 4,
  }
  want = 100 * 6 + 10 * 2 + 50 * 8 + 5 * 4
  assert mixq.bit_operations(operations, selected) == want
  assert mixq.bit_operations(operations, {}) == 32 * 165


def test_cora_mixq_three_stages(data_dir, tmp_path):
  config = lorap_jax.get_config("cora")
  config.quant.framework = "mixq"
  config.prompt.kind = "lorap"
  config.seeds = 1
  config.mixq.search_epochs, config.mixq.fp32_epochs = 5, 30
  config.mixq.finetune_epochs = 10
  config.data_dir = str(data_dir)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  # The fine-tuned fixed model keeps the FP32 stage's ~80%.
  assert summary["test_acc_mean"] > 0.7
  (chosen,) = summary["mixq_selected_bits"]
  assert set(chosen) == {
    "conv_0/linear/input",
    "conv_0/linear/weight",
    "conv_0/linear/xw",
    "conv_0/aggregate",
    "conv_1/linear/weight",
    "conv_1/linear/xw",
    "conv_1/aggregate",
  }
  assert set(chosen.values()) <= {2, 4, 8}
  assert summary["mixq_average_bits"] == pytest.approx(
    np.mean(list(chosen.values()))
  )
  assert (
    0 < summary["mixq_bit_operations"] < summary["mixq_bit_operations_fp32"]
  )
  stages = [
    json.loads(line)["stage"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  assert stages == ["search"] * 5 + ["fp32"] * 30 + ["fixed"] * 10
  assert summary["config"]["mixq"]["selected"] == ""  # the user's config


def test_bad_mixq_strings_are_refused():
  config = lorap_jax.get_config("cora")
  config.quant.framework = "mixq"
  config.mixq.candidates = "2,four"
  with pytest.raises(ValueError, match=r"mixq\.candidates=.2,four."):
    state_lib.quant_config(config)


def _complete_graphs_padded(sizes, features: int) -> jraph.GraphsTuple:
  """Complete graphs (dense, as IMDB's ego networks), one-hot features."""
  rng = np.random.default_rng(0)
  graphs = []
  for n in sizes:
    senders, receivers = np.nonzero(~np.eye(n, dtype=bool))
    graphs.append(
      jraph.GraphsTuple(
        nodes=np.eye(features, dtype=np.float32)[rng.integers(0, features, n)],
        edges=None,
        senders=senders.astype(np.int32),
        receivers=receivers.astype(np.int32),
        globals=None,
        n_node=np.array([n], np.int32),
        n_edge=np.array([len(senders)], np.int32),
      )
    )
  batch = jraph.batch_np(graphs)
  return jraph.pad_with_graphs(
    batch, sum(sizes) + 1, int(batch.n_edge.sum()), len(sizes) + 1
  )


def test_mixq_calibrates_a_batch_norm_model_as_in_training():
  """MixQ calibrates on its first training batch. Calibrated in evaluation
  mode, where BatchNorm divides by its initial averages (the identity), a
  GIN's sums over ~25 neighbours grew layer by layer: conv_4's aggregate
  scale was 124k (conv_1's 36), and on IMDB-MULTI every run diverged."""
  config = lorap_jax.get_config("imdb-multi")
  config.quant.framework = "mixq"
  config.prompt.kind = "none"
  model = lorap_jax.create_model(config, num_classes=3, task="graph")
  graph = _complete_graphs_padded((20, 30, 25), features=8)
  key = jax.random.key(0)
  state = state_lib.create_train_state(model, optax.adam(1e-3), graph, key, 4.0)
  params = state.params
  first, last = (
    float(jnp.max(params[f"conv_{i}"]["mixq_aggregate_scale"])) for i in (1, 4)
  )
  assert last < 2 * first, (first, last)  # Batch-normalised: no growth.
  # Only the calibration differs from `init`: weights, logits, copies
  # are the same.
  init = jax.jit(model.init, static_argnames="train")
  initial = init(key, graph, bits=jnp.float32(4.0), train=False)
  calibrated = flax.traverse_util.flatten_dict(params)
  for path, leaf in flax.traverse_util.flatten_dict(initial["params"]).items():
    if not path[-1].endswith(("_scale", "_zero")):
      np.testing.assert_array_equal(calibrated[path], leaf, err_msg=path)
