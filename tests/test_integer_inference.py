"""Tests of integer-only inference: packing, fixed point, export, agreement.

The fixed-point arithmetic is checked bit for bit against an int64 numpy
oracle and against float multiplication; the integer matmul against the
fake-quantized float matmul; and whole Cora GCNs (plain QAT and
Degree-Quant, INT8 and INT4, with LoRAP) against their own fake-quantized
eval forward.
"""

import fractions
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from absl.testing import parameterized

import lorap_jax

ROUNDINGS = ("half_even", "half_away", "half_up")


# ---------------------------------------------------------------------------
# INT4 packing.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16,), (3, 5), (1433, 7), (1,)])
def test_int4_pack_unpack_round_trip(shape):
  rng = np.random.default_rng(0)
  codes = rng.integers(-8, 8, shape).astype(np.int8)
  codes.reshape(-1)[: min(16, codes.size)] = np.arange(-8, 8)[: codes.size]
  packed = jax.jit(lorap_jax.pack_int4)(codes)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (math.ceil(codes.size / 2),)
  unpacked = jax.jit(lorap_jax.unpack_int4, static_argnums=1)(packed, shape)
  assert unpacked.dtype == jnp.int8
  np.testing.assert_array_equal(unpacked, codes)


def test_int4_packing_layout():
  # Low nibble first, two's complement: (1, -1) -> 0xF1, (-8, pad) -> 0x08.
  packed = lorap_jax.pack_int4(jnp.array([1, -1, -8]))
  np.testing.assert_array_equal(packed, [0xF1, 0x08])


# ---------------------------------------------------------------------------
# Fixed-point multipliers.
# ---------------------------------------------------------------------------


def _random_operands(n=20000, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(-(2**31), 2**31, n, dtype=np.int64).astype(np.int32)
  x[: n // 4] = rng.integers(-300, 300, n // 4)  # Typical accumulators.
  x[:4] = [-(2**31), 2**31 - 1, 0, -1]
  real = np.exp(rng.uniform(np.log(2.0**-40), np.log(2.0**20), n))
  # Exact ties: simple fractions times small accumulators.
  real[: n // 8] = rng.integers(1, 64, n // 8) / 2.0 ** rng.integers(
    0, 8, n // 8
  )
  offset = rng.integers(-128, 128, n).astype(np.int32)
  offset[n // 2 :] = 0
  return x, real, offset


def test_quantize_multiplier_range():
  _, real, _ = _random_operands()
  real = np.concatenate([real, [0.0, 1.0, 0.5, 2.0**-33]])
  fixed = lorap_jax.quantize_multiplier(real)
  m0 = fixed.multiplier.astype(np.int64)
  nonzero = m0 != 0
  assert np.all((m0[nonzero] >= 2**30) & (m0[nonzero] < 2**31))
  value = m0 * 2.0 ** (fixed.shift.astype(np.float64) - 31)
  np.testing.assert_allclose(value[nonzero], real[nonzero], rtol=2.0**-30)
  # Below 2^-32 a multiplier moves no int32 value: it becomes zero.
  assert m0[-4] == 0 and m0[-1] == 0


class FixedPointTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rounding=ROUNDINGS, tie_bits=(None, 22))
  def test_matches_int64_reference(self, rounding, tie_bits):
    x, real, offset = _random_operands()
    fixed = lorap_jax.quantize_multiplier(real)
    multiply = self.variant(
      lambda x, m, z: lorap_jax.multiply_by_quantized_multiplier(
        x, m, rounding=rounding, tie_bits=tie_bits, offset=z
      )
    )
    got = multiply(x, fixed, offset)
    want = lorap_jax.multiply_by_quantized_multiplier_reference(
      x, fixed, rounding=rounding, tie_bits=tie_bits, offset=offset
    )
    chex.assert_shape(got, x.shape)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gemmlowp_matches_int64_reference(self):
    x, real, _ = _random_operands(seed=1)
    fixed = lorap_jax.quantize_multiplier(real)
    multiply = self.variant(
      lambda x, m: lorap_jax.multiply_by_quantized_multiplier(
        x, m, rounding="gemmlowp"
      )
    )
    want = lorap_jax.multiply_by_quantized_multiplier_reference(
      x, fixed, rounding="gemmlowp"
    )
    np.testing.assert_array_equal(multiply(x, fixed), want)

  @parameterized.parameters(*ROUNDINGS, "gemmlowp")
  def test_within_one_code_of_float(self, rounding):
    x, real, _ = _random_operands(seed=2)
    exact = x.astype(np.float64) * real
    # Requantization results are codes: keep products within 2^20.
    inside = np.abs(exact) < 2**20
    fixed = lorap_jax.quantize_multiplier(real)
    got = np.asarray(
      lorap_jax.multiply_by_quantized_multiplier(
        x[inside],
        jax.tree.map(lambda f: f[inside], fixed),
        rounding=rounding,
      )
    )
    error = np.abs(got - exact[inside])
    assert error.max() <= 1.0
    if rounding != "gemmlowp":
      # One rounding: half a code, plus M0's 31-bit precision.
      assert error.max() <= 0.5 + 2.0**-10

  def test_single_rounding_tie_rules(self):
    fixed = lorap_jax.quantize_multiplier(0.5)
    x = jnp.array([1, 3, -1, -3])  # 0.5, 1.5, -0.5, -1.5.
    expected = {
      "half_even": [0, 2, 0, -2],
      "half_away": [1, 2, -1, -2],
      "half_up": [1, 2, 0, -1],
    }
    for rounding, want in expected.items():
      got = lorap_jax.multiply_by_quantized_multiplier(
        x, fixed, rounding=rounding
      )
      np.testing.assert_array_equal(got, want, err_msg=rounding)
    # The tie rule sees the value plus the zero point: round(0.5 + 1) = 2.
    got = lorap_jax.multiply_by_quantized_multiplier(
      x, fixed, rounding="half_even", offset=1
    )
    np.testing.assert_array_equal(got, [2, 2, 0, 0])

  def test_needs_no_64_bit_types(self):
    assert not jax.config.jax_enable_x64
    fixed = lorap_jax.quantize_multiplier(np.full(8, 0.3))
    jaxpr = jax.make_jaxpr(
      lambda x: lorap_jax.multiply_by_quantized_multiplier(
        x, fixed, rounding="half_even", tie_bits=22
      )
    )(jnp.arange(8, dtype=jnp.int32))
    dtypes = {
      v.aval.dtype for eqn in jaxpr.eqns for v in (*eqn.invars, *eqn.outvars)
    }
    assert all(np.dtype(d).itemsize <= 4 for d in dtypes), dtypes


# ---------------------------------------------------------------------------
# Integer matmul.
# ---------------------------------------------------------------------------


def _codes(x, grid):
  return np.asarray(lorap_jax.quantize_to_codes(x, grid), np.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sparse", [False, True])
def test_integer_matmul_matches_fake_quant_matmul(bits, sparse):
  rng = np.random.default_rng(bits)
  x = rng.uniform(0.0, 1.0, (40, 30)).astype(np.float32)
  x = np.where(rng.random(x.shape) < 0.8, 0.0, x).astype(np.float32)
  w = rng.normal(size=(30, 6)).astype(np.float32)
  x_grid = lorap_jax.affine_qparams(x.min(), x.max(), bits, signed=True)
  w_grid = lorap_jax.affine_qparams(w.min(), w.max(), bits, signed=True)
  x_codes, w_codes = _codes(x, x_grid), _codes(w, w_grid)
  dtype = np.int8
  if sparse:
    features = lorap_jax.SparseFeatures.from_dense(x)
    codes = features.replace_values(x_codes[features.rows, features.cols])
  else:
    codes = x_codes.astype(dtype)
  x_zero, w_zero = (jnp.int32(int(g.zero_point)) for g in (x_grid, w_grid))
  acc = jax.jit(lorap_jax.integer_matmul)(
    codes, x_zero, w_codes.astype(dtype), w_zero
  )
  chex.assert_shape(acc, (40, 6))
  assert acc.dtype == jnp.int32
  # The integer accumulator is the exact sum of code products.
  want = (x_codes.astype(np.int64) - int(x_zero)) @ (
    w_codes.astype(np.int64) - int(w_zero)
  )
  np.testing.assert_array_equal(acc, want)
  # Times s_x s_w it is the fake-quantized product.
  fake = lorap_jax.fake_quant(x, x_grid) @ lorap_jax.fake_quant(w, w_grid)
  scale = float(x_grid.scale) * float(w_grid.scale)
  np.testing.assert_allclose(np.asarray(acc) * scale, fake, atol=1e-4)
  # Requantized onto an xw grid, the codes are the fake quantizer's.
  xw_grid = lorap_jax.affine_qparams(fake.min(), fake.max(), bits, signed=True)
  multiplier = lorap_jax.quantize_multiplier(scale / float(xw_grid.scale))
  codes_int = lorap_jax.multiply_by_quantized_multiplier(
    acc,
    multiplier,
    rounding="half_even",
    tie_bits=22,
    offset=int(xw_grid.zero_point),
  )
  codes_int = np.clip(codes_int, int(xw_grid.qmin), int(xw_grid.qmax))
  codes_fake = _codes(fake, xw_grid)
  assert np.abs(codes_int - codes_fake).max() <= 1
  assert np.mean(codes_int == codes_fake) > 0.99


# ---------------------------------------------------------------------------
# Export and end-to-end agreement on Cora.
# ---------------------------------------------------------------------------

RUNS = (("qat", 8), ("qat", 4), ("dq", 8), ("dq", 4))


def _cora_config(data_dir, framework, bits):
  config = lorap_jax.get_config("cora")
  config.data_dir = str(data_dir)
  config.seeds = 1
  config.train.epochs = 6
  config.model.hidden = 16
  config.checkpoint.enabled = False
  config.quant.framework = framework
  config.quant.bits = bits
  return config  # LoRAP on: the float island is covered.


@pytest.fixture(scope="module")
def cora_runs(data_dir, tmp_path_factory):
  """Trained states, the sparse Cora graph and labels, per (framework, bits)."""
  dataset = lorap_jax.load_dataset("cora", str(data_dir))
  graph = dataset.graph
  features = np.asarray(graph.nodes, np.float32)
  graph = jax.device_put(
    graph._replace(nodes=lorap_jax.SparseFeatures.from_dense(features))
  )
  states = {}
  for framework, bits in RUNS:
    config = _cora_config(data_dir, framework, bits)
    workdir = tmp_path_factory.mktemp(f"{framework}{bits}")
    summary = lorap_jax.train_and_evaluate(config, workdir)
    states[framework, bits] = summary["states"][0]
  return states, graph, dataset


@jax.jit
def _eval_forward(state, graph):
  """The logits of `lorap_jax.eval_step` (the state traced, bits included)."""
  return state.apply_fn(state.variables(), graph, bits=state.bits, train=False)


@jax.jit
def _captured_points(state, graph):
  """The eval forward's quantization points and layer outputs, captured."""
  _, captured = state.apply_fn(
    state.variables(),
    graph,
    bits=state.bits,
    train=False,
    capture_intermediates=lambda _, method: method in ("qpoint", "__call__"),
    mutable=["intermediates"],
  )
  return captured["intermediates"]


def _codes_on(values, grid):
  return np.round(np.asarray(values) / float(grid.scale)) + int(grid.zero_point)


def _exact_table_value(code, source, target):
  """(q - z_out)+ s_out / s_in + z_in in exact rational arithmetic."""
  real = max(code - int(source.zero_point), 0) * fractions.Fraction(
    float(source.scale)
  )
  return real / fractions.Fraction(float(target.scale)) + int(target.zero_point)


def _following_fake_ties(integer_model, state, graph):
  """The exported model with its ReLU tables breaking ties as the fake one.

  The tables round exactly; the float32 fake-quantized model decides exact
  ties and values within float32 rounding of one by rounding noise that
  depends on how XLA compiled it (on one machine 3.5% of an INT4
  Degree-Quant layer's inputs sat on an exact tie it broke against the tie
  rule). Every entry where the two differ must be such a (near-)tie; it
  then takes the fake model's choice, so that what is compared downstream
  is the integer arithmetic.
  """
  captured = jax.device_get(_captured_points(state, graph))
  exported = list(integer_model.layers)
  for i in range(1, len(exported)):
    previous, layer = exported[i - 1], exported[i]
    outputs = captured[f"conv_{i - 1}"]["__call__"][0].nodes
    source = _codes_on(outputs, previous.output)
    source = np.maximum(source, int(previous.output.zero_point))  # ReLU.
    inputs = captured[f"conv_{i}"]["linear"]["qpoint"][0]
    chosen = _codes_on(inputs, layer.input)
    table = np.array(layer.input_table)
    for code in np.unique(source).astype(int):
      fake_codes = np.unique(chosen[source == code])
      assert fake_codes.size == 1, (i, code, fake_codes)
      entry = code - integer_model.qmin
      if fake_codes[0] != table[entry]:
        exact = _exact_table_value(code, previous.output, layer.input)
        below = math.floor(exact)
        distance_to_tie = abs(exact - below - fractions.Fraction(1, 2))
        # float32 rounds x / s_in, then adds z_in: noise of a few ulps of
        # either.
        zero_point = int(layer.input.zero_point)
        magnitude = abs(exact - zero_point) + abs(zero_point) + 1
        assert distance_to_tie <= 2.0**-20 * magnitude, (i, code, exact)
        assert fake_codes[0] in (below, below + 1), (i, code, exact)
        table[entry] = fake_codes[0]
    exported[i] = layer._replace(input_table=jnp.asarray(table))
  return integer_model.replace(layers=tuple(exported))


@pytest.mark.parametrize(("framework", "bits"), RUNS)
def test_exported_tables_round_exact_ties_by_the_rule(
  cora_runs, framework, bits
):
  states, _, _ = cora_runs
  integer_model = lorap_jax.export_integer_model(states[framework, bits])
  for previous, layer in itertools.pairwise(integer_model.layers):
    codes = range(integer_model.qmin, integer_model.qmax + 1)
    exact = [_exact_table_value(c, previous.output, layer.input) for c in codes]
    # Python rounds a Fraction half to even, as the model's torch.round.
    want = np.clip(
      [round(v) for v in exact], integer_model.qmin, integer_model.qmax
    )
    np.testing.assert_array_equal(layer.input_table, want)


@pytest.mark.parametrize(("framework", "bits"), RUNS)
def test_integer_inference_agrees_with_fake_quant(cora_runs, framework, bits):
  states, graph, dataset = cora_runs
  state = states[framework, bits]
  fake = np.asarray(_eval_forward(state, graph))
  integer_model = lorap_jax.export_integer_model(state)
  assert integer_model.bits == bits
  integer_model = _following_fake_ties(integer_model, state, graph)
  out = jax.jit(lorap_jax.integer_forward)(integer_model, graph)
  n_nodes, n_classes = fake.shape
  chex.assert_shape((out.codes, out.logits), (n_nodes, n_classes))
  assert out.codes.dtype == jnp.int32
  step = float(integer_model.layers[-1].output.scale)
  logits = np.asarray(out.logits)
  steps = np.abs(logits - fake) / step
  predicted, predicted_fake = np.argmax(logits, -1), np.argmax(fake, -1)
  agreement = np.mean(predicted == predicted_fake)
  within_one = np.mean(steps.max(axis=1) <= 1.0 + 1e-3)
  if framework == "qat":
    # Plain QAT: every logit within one step (the codes in fact match).
    assert agreement >= 0.999
    assert steps.max() <= 1.0 + 1e-3
  else:
    # Degree-Quant: its ranges are data values, so messages and aggregates
    # also meet (near-)ties that the reference breaks by float32 noise
    # (0.25% of an INT8 model's messages in one run), and a one-code
    # difference grows downstream, through the next layer's weights, to a
    # few steps (see lorap_jax/_src/integer_inference.py). So a prediction
    # may differ only where the integer logits' top two are within a step
    # of a tie, and logits by a few steps on a few percent of the nodes.
    assert agreement >= 0.998
    top_two = np.sort(logits, axis=-1)[:, -2:]
    gaps = (top_two[:, 1] - top_two[:, 0]) / step
    assert gaps[predicted != predicted_fake].max(initial=0.0) <= 1.0 + 1e-3
    assert within_one >= 0.97
    assert np.mean(steps.max(axis=1) > 2.0 + 1e-3) <= 0.005
    assert steps.max() <= 4.0 + 1e-3
  # Test accuracies differ by at most the disagreeing test nodes.
  test = np.asarray(dataset.test_mask)
  labels = np.asarray(dataset.labels)
  correct = np.sum((predicted == labels)[test])
  correct_fake = np.sum((predicted_fake == labels)[test])
  assert abs(correct - correct_fake) <= np.sum(
    (predicted != predicted_fake)[test]
  )


def test_exported_model_memory(cora_runs):
  states, graph, _ = cora_runs
  int8 = lorap_jax.export_integer_model(states["qat", 8])
  int4 = lorap_jax.export_integer_model(states["qat", 4])
  for layer in int4.layers:
    size = math.prod(layer.weight.shape)
    assert layer.weight.data.dtype == jnp.uint8
    assert layer.weight.data.shape == (math.ceil(size / 2),)
  for layer in int8.layers:
    assert layer.weight.data.dtype == jnp.int8
  fp32_kb = lorap_jax.model_memory_kb(states["qat", 8].params)
  assert lorap_jax.model_memory_kb(int4) < lorap_jax.model_memory_kb(int8)
  assert lorap_jax.model_memory_kb(int8) < fp32_kb / 3
  n_nodes = graph.nodes.shape[0]
  fp32 = lorap_jax.feature_memory_kb(int8, n_nodes, bits=32)
  features = [lorap_jax.feature_memory_kb(m, n_nodes) for m in (int8, int4)]
  widths = (1433, 16, 7)  # Layer inputs, then the logits.
  want = tuple(math.ceil(n_nodes * w / 2) / 1024 for w in widths)
  assert features[1].tensors_kb == pytest.approx(want)
  assert features[0].total_kb == pytest.approx(2 * features[1].total_kb, 1e-3)
  assert fp32.total_kb == pytest.approx(4 * features[0].total_kb)
  assert fp32.largest_kb == pytest.approx(n_nodes * 1433 * 4 / 1024)


def _tiny_graph():
  senders = jnp.array([0, 1, 1, 2], jnp.int32)
  receivers = jnp.array([1, 0, 2, 1], jnp.int32)
  return jraph.GraphsTuple(
    nodes=jnp.ones((3, 4)),
    edges=None,
    senders=senders,
    receivers=receivers,
    n_node=jnp.array([3]),
    n_edge=jnp.array([4]),
    globals=None,
  )


@pytest.mark.parametrize(
  ("framework", "architecture", "message"),
  [
    ("fp32", "gcn", "FP32"),
    ("a2q", "gcn", "A2Q"),
    ("qat", "gin", "GCN"),
    ("qat", "gcn", "never calibrated"),
  ],
)
def test_export_refuses_models_without_integer_form(
  framework, architecture, message
):
  config = lorap_jax.get_config("cora")
  config.quant.framework = framework
  config.model.architecture = architecture
  config.model.hidden = 8
  model = lorap_jax.create_model(config, num_classes=2, task="node")
  variables = {"params": {}}  # The model alone decides, except for ranges.
  if message == "never calibrated":
    init = jax.jit(lambda key, graph: model.init(key, graph, bits=4.0))
    variables = init(jax.random.key(0), _tiny_graph())
  with pytest.raises(ValueError, match=message):
    lorap_jax.export_integer_model(variables, model, bits=4)
