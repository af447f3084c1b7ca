"""Tests of fake quantization: numerics, STE gradients and calibration.

Every expectation is computed independently in numpy from the bucket
arithmetic documented in `lorap_jax._src.quantization` (Degree-Quant's
`IntegerQuantizer`).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import lorap_jax

F32_EPS = np.float32(np.finfo(np.float32).eps)
BIT_WIDTHS = (2, 4, 8)


# ---------------------------------------------------------------------------
# numpy reference of the bucket arithmetic.
# ---------------------------------------------------------------------------


def np_integer_range(bits, signed):
  """qmin, qmax of the integer grid, float32."""
  bits = np.float32(bits)
  if signed:
    return -(np.float32(2.0) ** (bits - 1)), np.float32(2.0) ** (bits - 1) - 1
  return np.float32(0.0), np.float32(2.0) ** bits - 1


def np_affine_qparams(lo, hi, bits, signed=False):
  """The affine table of the module docstring, in float32 numpy."""
  qmin, qmax = np_integer_range(bits, signed)
  lo = np.minimum(np.float32(lo), np.float32(0.0))
  hi = np.maximum(np.float32(hi), np.float32(0.0))
  if hi == lo:
    return np.float32(1.0), np.float32(0.0), qmin, qmax
  scale = np.maximum((hi - lo) / (qmax - qmin), F32_EPS)
  zero_point = np.clip(qmin - np.round(lo / scale), qmin, qmax)
  return np.float32(scale), np.float32(zero_point), qmin, qmax


def np_fake_quant(x, scale, zero_point, qmin, qmax):
  """(clip(round_half_even(x / s + z), qmin, qmax) - z) * s."""
  x = np.asarray(x, np.float32)
  codes = np.clip(np.round(x / scale + zero_point), qmin, qmax)
  return ((codes - zero_point) * scale).astype(np.float32)


def np_kth_smallest(values, k):
  """torch.kthvalue: the k-th smallest (1-indexed) of a flat array."""
  return np.sort(np.asarray(values).reshape(-1))[k - 1]


def torch_percentile_range(values, fraction):
  """Degree-Quant's percentile range: kthvalue at int(n * p), int(n(1-p)).

  Its IntegerQuantizer clamps both indices to [1, n]; the products are
  Python (float64) arithmetic.
  """
  n = np.asarray(values).size
  k_lo = max(1, min(n, int(n * fraction)))
  k_hi = min(n, max(1, int(n * (1 - fraction))))
  return np_kth_smallest(values, k_lo), np_kth_smallest(values, k_hi)


def _random(shape, seed, scale=2.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(
    np.float32
  )


# ---------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------


class FakeQuantTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=BIT_WIDTHS, signed=(False, True))
  def test_values_lie_on_the_integer_grid(self, bits, signed):
    lo, hi = -1.5, 2.0
    x = np.concatenate([_random((200,), seed=bits), [0.0, -9.0, 9.0]])
    x = x.astype(np.float32)

    @self.variant
    def quantize(x):
      return lorap_jax.fake_quant(
        x, lorap_jax.affine_qparams(lo, hi, bits, signed=signed)
      )

    y = np.asarray(quantize(jnp.asarray(x)))
    chex.assert_shape(y, x.shape)
    scale, zero_point, qmin, qmax = np_affine_qparams(lo, hi, bits, signed)

    codes = y / scale + zero_point
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3

    grid_lo = (qmin - zero_point) * scale
    grid_hi = (qmax - zero_point) * scale
    inside = (x >= grid_lo) & (x <= grid_hi)
    assert inside.sum() > 50 and (~inside).sum() >= 2
    assert np.all(np.abs(y - x)[inside] <= scale / 2 + 1e-6)
    np.testing.assert_allclose(y[x < grid_lo], grid_lo, rtol=1e-6)
    np.testing.assert_allclose(y[x > grid_hi], grid_hi, rtol=1e-6)
    # Zero is on the grid exactly (the range is widened to contain it).
    assert y[200] == 0.0
    chex.assert_trees_all_close(
      y, np_fake_quant(x, scale, zero_point, qmin, qmax), atol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("positive_range", 0.5, 3.0),
    ("negative_range", -3.0, -0.5),
    ("tiny_range", 0.0, 1e-9),
  )
  def test_zero_maps_to_zero(self, lo, hi):
    quantize = self.variant(
      lambda x: lorap_jax.fake_quant(x, lorap_jax.affine_qparams(lo, hi, 4))
    )
    assert float(quantize(jnp.zeros(()))) == 0.0

  def test_docstring_example(self):
    grid = lorap_jax.affine_qparams(0.0, 1.5, 2)
    y = lorap_jax.fake_quant(jnp.array([0.2, 0.3, 2.0]), grid)
    chex.assert_trees_all_close(y, np.array([0.0, 0.5, 1.5]), atol=1e-7)

  @parameterized.product(bits=BIT_WIDTHS, signed=(False, True))
  def test_quantize_to_codes_matches_numpy(self, bits, signed):
    x = _random((50,), seed=7)
    # Not [-1, 1]: its zero point, 1 / (2 / (2^b - 1)), is a rounding tie,
    # which a GPU's float32 division breaks the other way.
    grid = lorap_jax.affine_qparams(-1.0, 1.3, bits, signed=signed)
    scale, zero_point, qmin, qmax = np_affine_qparams(-1.0, 1.3, bits, signed)
    expected = np.clip(np.round(x / scale + zero_point), qmin, qmax)
    codes = lorap_jax.quantize_to_codes(jnp.asarray(x), grid)
    chex.assert_trees_all_close(codes, expected, atol=0)

  def test_unknown_rounding_and_gradient_are_refused(self):
    grid = lorap_jax.affine_qparams(-1.0, 1.0, 4)
    with pytest.raises(ValueError, match="rounding='up' is not one of"):
      lorap_jax.fake_quant(jnp.ones(3), grid, rounding="up")
    with pytest.raises(ValueError, match="gradient='none' is not one of"):
      lorap_jax.fake_quant(jnp.ones(3), grid, gradient="none")


class QParamsTest(parameterized.TestCase):
  @parameterized.product(
    lo_hi=(
      (-1.0, 3.0),
      (0.5, 2.0),  # widened down to 0
      (-3.0, -1.0),  # widened up to 0
      (-2.0, 0.7),
      (0.0, 1e-9),  # scale floored at eps
      (-1e-9, 0.0),
      (0.0, 0.0),  # empty: scale 1, zero point 0
      (2.0, 2.0),  # not empty once widened
      (-5.0, -5.0),
    ),
    bits=(1, 2, 4, 8, 16),
    signed=(False, True),
  )
  def test_affine_qparams_follow_the_table(self, lo_hi, bits, signed):
    lo, hi = lo_hi
    got = lorap_jax.affine_qparams(lo, hi, bits, signed=signed)
    want = np_affine_qparams(lo, hi, bits, signed)
    chex.assert_trees_all_close(tuple(got), want, rtol=1e-6, atol=0)

  def test_affine_qparams_special_cases(self):
    empty = lorap_jax.affine_qparams(0.0, 0.0, 4)
    assert float(empty.scale) == 1.0 and float(empty.zero_point) == 0.0
    tiny = lorap_jax.affine_qparams(0.0, 1e-12, 8)
    assert float(tiny.scale) == F32_EPS
    # Signed 4-bit grid over [-1, 3]: s = 4 / 15, z = -8 - round(-3.75) = -4.
    signed = lorap_jax.affine_qparams(-1.0, 3.0, 4, signed=True)
    chex.assert_trees_all_close(
      tuple(signed), (4 / 15, -4.0, -8.0, 7.0), atol=1e-7
    )

  def test_affine_qparams_per_channel(self):
    lo = np.array([-1.0, 0.5, -2.0], np.float32)
    hi = np.array([1.0, 4.0, -1.0], np.float32)
    got = lorap_jax.affine_qparams(jnp.asarray(lo), jnp.asarray(hi), 4)
    chex.assert_shape(got.scale, (3,))
    want = [np_affine_qparams(a, b, 4) for a, b in zip(lo, hi, strict=True)]
    chex.assert_trees_all_close(
      (got.scale, got.zero_point),
      (np.array([w[0] for w in want]), np.array([w[1] for w in want])),
      rtol=1e-6,
    )

  @parameterized.product(bits=(1, 2, 4, 8), abs_max=(0.0, 0.3, 2.0))
  def test_symmetric_qparams(self, bits, abs_max):
    grid = lorap_jax.symmetric_qparams(abs_max, bits)
    levels = 2.0 ** (bits - 1) - 1
    want_scale = max(abs_max, F32_EPS) / max(levels, 1.0)
    chex.assert_trees_all_close(
      tuple(grid), (want_scale, 0.0, -levels, levels), rtol=1e-6, atol=0
    )

  def test_symmetric_grid_is_symmetric(self):
    grid = lorap_jax.symmetric_qparams(2.0, 4)  # levels -7..7, step 2/7
    y = lorap_jax.fake_quant(jnp.array([-100.0, -2.0, 0.0, 2.0, 100.0]), grid)
    chex.assert_trees_all_close(
      y, np.array([-2.0, -2.0, 0.0, 2.0, 2.0]), atol=1e-6
    )

  @parameterized.product(bits=(1, 3, 8, 16), signed=(False, True))
  def test_integer_range(self, bits, signed):
    qmin, qmax = lorap_jax.integer_range(bits, signed=signed)
    if signed:
      want = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
      want = (0, 2**bits - 1)
    assert (float(qmin), float(qmax)) == want


class RoundingTest(parameterized.TestCase):
  TIES = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5], np.float32)

  @parameterized.named_parameters(
    ("half_even", "half_even", [0, 2, 2, 0, -2, -2, 4, -4]),
    ("half_away", "half_away", [1, 2, 3, -1, -2, -3, 4, -4]),
  )
  def test_ties(self, mode, want):
    got = lorap_jax.round_to_integer(jnp.asarray(self.TIES), mode)
    np.testing.assert_array_equal(np.asarray(got), np.array(want, np.float32))
    # Through the quantizer, on a unit-step signed grid.
    grid = lorap_jax.QParams(
      *map(jnp.asarray, (1.0, 0.0, -8.0, 7.0))  # scale 1, zero point 0
    )
    y = lorap_jax.fake_quant(jnp.asarray(self.TIES), grid, rounding=mode)
    np.testing.assert_array_equal(np.asarray(y), np.array(want, np.float32))

  def test_non_ties_agree(self):
    x = jnp.array([0.49, 0.51, -0.49, -0.51, 2.3, -2.7])
    want = np.array([0.0, 1.0, 0.0, -1.0, 2.0, -3.0], np.float32)
    for mode in ("half_even", "half_away"):
      got = lorap_jax.round_to_integer(x, mode)
      np.testing.assert_array_equal(np.asarray(got), want)

  def test_unknown_mode(self):
    with pytest.raises(ValueError, match="rounding='down' is not one of"):
      lorap_jax.round_to_integer(jnp.ones(2), "down")


# ---------------------------------------------------------------------------
# Straight-through estimators.
# ---------------------------------------------------------------------------


def _clip_mask(x, lo, hi, bits, signed=False):
  """Where the unclipped code lies in [qmin, qmax] (numpy)."""
  scale, zero_point, qmin, qmax = np_affine_qparams(lo, hi, bits, signed)
  codes = np.round(x / scale + zero_point)
  return ((codes >= qmin) & (codes <= qmax)).astype(np.float32)


class StraightThroughTest(chex.TestCase):
  X = _random((300,), seed=3, scale=2.0)
  COTANGENT = _random((300,), seed=4, scale=1.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=BIT_WIDTHS, signed=(False, True))
  def test_identity_gradient_everywhere(self, bits, signed):
    def loss(x):
      grid = lorap_jax.affine_qparams(-1.0, 1.0, bits, signed=signed)
      y = lorap_jax.fake_quant(x, grid, gradient="identity")
      return jnp.sum(y * self.COTANGENT)

    grad = self.variant(jax.grad(loss))(jnp.asarray(self.X))
    chex.assert_shape(grad, self.X.shape)
    # Many values are clipped (|x| > 1) and still get the full gradient.
    assert _clip_mask(self.X, -1.0, 1.0, bits, signed).min() == 0.0
    chex.assert_trees_all_close(grad, self.COTANGENT, atol=0)
    ones = self.variant(
      jax.grad(
        lambda x: jnp.sum(
          lorap_jax.fake_quant(x, lorap_jax.affine_qparams(-1.0, 1.0, bits))
        )
      )
    )(jnp.asarray(self.X))
    chex.assert_trees_all_close(ones, np.ones_like(self.X), atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=BIT_WIDTHS, signed=(False, True))
  def test_clipped_gradient_is_masked(self, bits, signed):
    def loss(x):
      grid = lorap_jax.affine_qparams(-1.0, 1.0, bits, signed=signed)
      y = lorap_jax.fake_quant(x, grid, gradient="clipped")
      return jnp.sum(y * self.COTANGENT)

    grad = self.variant(jax.grad(loss))(jnp.asarray(self.X))
    mask = _clip_mask(self.X, -1.0, 1.0, bits, signed)
    assert 0 < mask.sum() < mask.size
    chex.assert_trees_all_close(grad, self.COTANGENT * mask, atol=0)

  def test_clipped_gradient_at_known_points(self):
    grid = lorap_jax.affine_qparams(0.0, 1.5, 2)  # levels 0, .5, 1, 1.5
    x = jnp.array([-1.0, -0.2, 0.0, 0.7, 1.5, 1.7, 3.0])
    grad = jax.grad(
      lambda x: jnp.sum(lorap_jax.fake_quant(x, grid, gradient="clipped"))
    )(x)
    # -0.2 and 1.7 round onto the end codes, so they are not clipped.
    np.testing.assert_array_equal(
      np.asarray(grad), [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    )

  def test_degree_quant_gc_stops_the_boundary_codes(self):
    # Degree-Quant's GC zeroes the gradient where code >= qmax or code <=
    # qmin: the end codes too, unlike PyTorch's fake_quantize.
    grid = lorap_jax.affine_qparams(0.0, 1.5, 2)  # levels 0, .5, 1, 1.5
    x = jnp.array([-1.0, -0.2, 0.0, 0.3, 0.7, 1.2, 1.5, 1.7, 3.0])
    grad = jax.grad(
      lambda x: jnp.sum(lorap_jax.fake_quant(x, grid, gradient="clipped_inner"))
    )(x)
    np.testing.assert_array_equal(
      np.asarray(grad), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("identity", "identity"),
    ("clipped", "clipped"),
    ("clipped_inner", "clipped_inner"),
  )
  def test_grid_gets_no_gradient(self, gradient):
    x = jnp.asarray(self.X)

    def loss(lo, hi, bits):
      grid = lorap_jax.affine_qparams(lo, hi, bits)
      return jnp.sum(lorap_jax.fake_quant(x, grid, gradient=gradient) ** 2)

    grads = self.variant(jax.grad(loss, argnums=(0, 1, 2)))(-1.0, 1.0, 4.0)
    chex.assert_trees_all_close(grads, (0.0, 0.0, 0.0), atol=0)

    def loss_of_grid(grid):
      return jnp.sum(lorap_jax.fake_quant(x, grid, gradient=gradient) ** 2)

    grid = lorap_jax.affine_qparams(-1.0, 1.0, 4)
    grid_grads = self.variant(jax.grad(loss_of_grid))(grid)
    chex.assert_trees_all_close(tuple(grid_grads), (0.0, 0.0, 0.0, 0.0), atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grid_under_stop_gradient_is_a_constant(self):
    x = jnp.asarray(self.X)

    def loss(x):
      lo, hi = jax.lax.stop_gradient((jnp.min(x), jnp.max(x)))
      grid = lorap_jax.affine_qparams(lo, hi, 4)
      return jnp.sum(lorap_jax.fake_quant(x, grid) * self.COTANGENT)

    grad = self.variant(jax.grad(loss))(x)
    chex.assert_trees_all_close(grad, self.COTANGENT, atol=0)


# ---------------------------------------------------------------------------
# Bit widths as arrays: vmap.
# ---------------------------------------------------------------------------


class VmapBitsTest(chex.TestCase):
  X = _random((64,), seed=5)
  BITS = np.array([2.0, 4.0, 8.0], np.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_bits_equals_separate_calls(self):
    def quantize(bits, x, lo, hi):
      return lorap_jax.fake_quant(x, lorap_jax.affine_qparams(lo, hi, bits))

    swept = self.variant(jax.vmap(quantize, in_axes=(0, None, None, None)))(
      jnp.asarray(self.BITS), jnp.asarray(self.X), -1.0, 1.5
    )
    chex.assert_shape(swept, (3, self.X.shape[0]))
    for i, bits in enumerate(self.BITS):
      separate = lorap_jax.fake_quant(
        jnp.asarray(self.X), lorap_jax.affine_qparams(-1.0, 1.5, bits)
      )
      chex.assert_trees_all_close(swept[i], separate, atol=0)
      want = np_fake_quant(self.X, *np_affine_qparams(-1.0, 1.5, bits))
      chex.assert_trees_all_close(swept[i], want, atol=1e-6)
    # Different widths really give different results.
    assert not np.allclose(swept[0], swept[2])

  def test_vmap_closure_form(self):
    x = jnp.asarray(self.X)
    swept = jax.vmap(
      lambda b: lorap_jax.fake_quant(x, lorap_jax.affine_qparams(-1.0, 1.5, b))
    )(jnp.array([2.0, 4.0, 8.0]))
    for i, bits in enumerate((2, 4, 8)):
      want = np_fake_quant(self.X, *np_affine_qparams(-1.0, 1.5, bits))
      chex.assert_trees_all_close(swept[i], want, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_grad_over_bits(self):
    def loss(x, bits):
      grid = lorap_jax.affine_qparams(-0.8, 0.9, bits, signed=True)
      return jnp.sum(lorap_jax.fake_quant(x, grid, gradient="clipped"))

    grads = self.variant(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(
      jnp.asarray(self.X), jnp.asarray(self.BITS)
    )
    chex.assert_shape(grads, (3, self.X.shape[0]))
    for i, bits in enumerate(self.BITS):
      mask = _clip_mask(self.X, -0.8, 0.9, bits, signed=True)
      chex.assert_trees_all_close(grads[i], mask, atol=0)
      chex.assert_trees_all_close(
        grads[i], jax.grad(loss)(jnp.asarray(self.X), bits), atol=0
      )

  def test_vmap_over_per_example_ranges(self):
    x = jnp.asarray(self.X.reshape(4, 16))
    # No zero point on a rounding tie (see test_quantize_to_codes_...).
    lo = jnp.array([-1.0, -0.5, 0.0, -2.0])
    hi = jnp.array([1.2, 2.0, 0.5, 0.1])
    swept = jax.vmap(
      lambda x, lo, hi, bits: lorap_jax.fake_quant(
        x, lorap_jax.affine_qparams(lo, hi, bits)
      ),
      in_axes=(0, 0, 0, None),
    )(x, lo, hi, 3.0)
    for i in range(4):
      want = np_fake_quant(
        self.X.reshape(4, 16)[i], *np_affine_qparams(lo[i], hi[i], 3)
      )
      chex.assert_trees_all_close(swept[i], want, atol=1e-6)


# ---------------------------------------------------------------------------
# check_bits.
# ---------------------------------------------------------------------------


class CheckBitsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("zero", 0, r"bits=\[0\.0\] must be integers in 1\.\.16"),
    ("seventeen", 17, r"bits=\[17\.0\] must be integers in 1\.\.16"),
    ("fraction", 2.5, r"bits=\[2\.5\] must be integers in 1\.\.16"),
    ("negative", -4, r"bits=\[-4\.0\] must be integers"),
    ("array", np.array([4, 8, 32]), r"bits=\[32\.0\] must be integers"),
  )
  def test_refuses(self, bits, message):
    with pytest.raises(ValueError, match=message):
      lorap_jax.check_bits(bits)

  @parameterized.named_parameters(
    ("one", 1),
    ("sixteen", 16),
    ("float", 8.0),
    ("array", np.array([1, 2, 16])),
  )
  def test_accepts(self, bits):
    assert lorap_jax.check_bits(bits) is None

  def test_ignores_tracers(self):
    @jax.jit
    def checked(bits):
      lorap_jax.check_bits(bits)  # a tracer here: not inspected
      return bits + 1

    assert float(checked(jnp.asarray(17.0))) == 18.0
    assert float(jax.vmap(checked)(jnp.array([0.0, 2.5]))[1]) == 3.5


# ---------------------------------------------------------------------------
# Calibration.
# ---------------------------------------------------------------------------


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (`jnp.where`'s) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", None)
      if inner is not None:
        yield from _equations(getattr(inner, "jaxpr", inner))


class ObserveTest(chex.TestCase):
  X = _random((40, 8), seed=11)
  ROW_MASK = np.random.default_rng(12).random((40, 1)) < 0.6

  @chex.variants(with_jit=True, without_jit=True)
  def test_minmax(self):
    lo, hi = self.variant(lorap_jax.observe_minmax)(jnp.asarray(self.X))
    chex.assert_trees_all_close((lo, hi), (self.X.min(), self.X.max()), atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_minmax_masked(self):
    observe = self.variant(lorap_jax.observe_minmax)
    # A broadcast [n, 1] row mask.
    lo, hi = observe(jnp.asarray(self.X), jnp.asarray(self.ROW_MASK))
    kept = self.X[self.ROW_MASK[:, 0]]
    assert kept.min() > self.X.min() or kept.max() < self.X.max()
    chex.assert_trees_all_close((lo, hi), (kept.min(), kept.max()), atol=0)
    # A full elementwise mask.
    mask = self.X > 0.5
    lo, hi = observe(jnp.asarray(self.X), jnp.asarray(mask))
    chex.assert_trees_all_close(
      (lo, hi), (self.X[mask].min(), self.X[mask].max()), atol=0
    )
    # Nothing unmasked: (0, 0).
    lo, hi = observe(jnp.asarray(self.X), jnp.zeros((40, 1), bool))
    chex.assert_trees_all_close((lo, hi), (0.0, 0.0), atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    # Masks broadcast over some axes (reduced over those first), or none.
    ("messages", (30, 1, 8), (30, 1, 1)),
    ("columns", (40, 8), (1, 8)),
    ("lower_rank", (40, 8), (8,)),
    ("middle", (6, 5, 8), (6, 1, 8)),
    ("elementwise", (6, 5, 8), (6, 5, 8)),
  )
  def test_minmax_broadcast_masks_and_non_finite_values(
    self, shape, mask_shape
  ):
    rng = np.random.default_rng(13)
    x = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(mask_shape) < 0.5
    mask.flat[0], mask.flat[-1] = True, False
    full = np.broadcast_to(mask, shape)
    # Non-finite values the mask hides change nothing.
    x[~full] = rng.choice([np.nan, np.inf, -np.inf], size=(~full).sum())
    observe = self.variant(lorap_jax.observe_minmax)
    lo, hi = observe(jnp.asarray(x), jnp.asarray(mask))
    want = (x[full].min(), x[full].max())
    chex.assert_trees_all_close((lo, hi), want, atol=0)
    # A NaN the mask keeps shows in both ends, as in an unmasked reduction.
    x[np.unravel_index(np.flatnonzero(full)[0], shape)] = np.nan
    lo, hi = observe(jnp.asarray(x), jnp.asarray(mask))
    assert np.isnan(lo) and np.isnan(hi)

  def test_a_row_mask_selects_rows_not_elements(self):
    # XLA:CPU materialised a `where` over every element before reducing;
    # with a row mask only the rows' minima and maxima are selected.
    jaxpr = jax.make_jaxpr(lorap_jax.observe_minmax)(
      jnp.zeros((300, 64)), jnp.zeros((300, 1), bool)
    )
    selected = [
      eqn.outvars[0].aval.shape
      for eqn in _equations(jaxpr.jaxpr)
      if eqn.primitive.name == "select_n"
    ]
    assert (300, 1) in selected and (300, 64) not in selected, selected

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("p01_n300", 0.01, 300),
    ("p001_n2500", 0.001, 2500),
    ("p05_n77", 0.05, 77),
    ("p1_n57", 0.1, 57),
    ("p25_n13", 0.25, 13),
    ("p01_n5", 0.01, 5),
    ("p3_n2", 0.3, 2),
    ("p45_n1", 0.45, 1),
  )
  def test_percentile(self, fraction, n):
    x = _random((n,), seed=n)
    observe = self.variant(lambda x: lorap_jax.observe_percentile(x, fraction))
    lo, hi = observe(jnp.asarray(x))
    chex.assert_trees_all_close(
      (lo, hi), torch_percentile_range(x, fraction), atol=0
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("p01", 0.01),
    ("p1", 0.1),
    ("p2", 0.2),
  )
  def test_percentile_masked(self, fraction):
    observe = self.variant(
      lambda x, m: lorap_jax.observe_percentile(x, fraction, m)
    )
    lo, hi = observe(jnp.asarray(self.X), jnp.asarray(self.ROW_MASK))
    kept = self.X[self.ROW_MASK[:, 0]]
    chex.assert_trees_all_close(
      (lo, hi), torch_percentile_range(kept, fraction), atol=0
    )
    lo, hi = observe(jnp.asarray(self.X), jnp.zeros((40, 1), bool))
    chex.assert_trees_all_close((lo, hi), (0.0, 0.0), atol=0)

  def test_percentile_index_rule_in_float64(self):
    # n * p just below an integer in float64, rounded up to it in float32:
    # int(90 * 0.7) = 62, where float32's floor gives 63;
    # int(17001 * 0.999) = 16983, where float32's floor gives 16984.
    for fraction, n in ((0.3, 90), (0.001, 17001), (0.29, 100)):
      x = np.arange(n, dtype=np.float32)[::-1].copy()  # k-th smallest = k - 1
      lo, hi = lorap_jax.observe_percentile(jnp.asarray(x), fraction)
      want = torch_percentile_range(x, fraction)
      assert (float(lo), float(hi)) == (float(want[0]), float(want[1])), (
        fraction,
        n,
        (float(lo), float(hi)),
        want,
      )
      # The same n as a traced count of the unmasked elements of a larger
      # tensor, under jit.
      padded = np.concatenate([x, np.full(n // 3, 1e6, np.float32)])
      mask = np.arange(padded.size) < n
      observe = jax.jit(lorap_jax.observe_percentile, static_argnums=1)
      lo, hi = observe(jnp.asarray(padded), fraction, jnp.asarray(mask))
      assert (float(lo), float(hi)) == (float(want[0]), float(want[1]))


class RangeStateTest(chex.TestCase):
  def test_init_range_state(self):
    state = lorap_jax.init_range_state((3,))
    chex.assert_shape((state.lo, state.hi), (3,))
    assert not bool(state.initialized)

  def test_update_ema(self):
    state = lorap_jax.init_range_state()
    state = lorap_jax.update_ema(state, -1.0, 2.0, 0.1)
    assert bool(state.initialized)
    chex.assert_trees_all_close((state.lo, state.hi), (-1.0, 2.0), atol=0)
    state = lorap_jax.update_ema(state, -3.0, 4.0, 0.1)
    # r <- r + m (cur - r).
    chex.assert_trees_all_close(
      (state.lo, state.hi), (-1.0 + 0.1 * -2.0, 2.0 + 0.1 * 2.0), atol=1e-6
    )
    assert bool(state.initialized)

  def test_update_running_only_widens(self):
    state = lorap_jax.update_running(lorap_jax.init_range_state(), 0.5, 2.0)
    # The first observation sets the range even though 0 < 0.5.
    chex.assert_trees_all_close((state.lo, state.hi), (0.5, 2.0), atol=0)
    state = lorap_jax.update_running(state, 1.0, 3.0)
    chex.assert_trees_all_close((state.lo, state.hi), (0.5, 3.0), atol=0)
    state = lorap_jax.update_running(state, -2.0, 1.0)
    chex.assert_trees_all_close((state.lo, state.hi), (-2.0, 3.0), atol=0)
    assert bool(state.initialized)


class CalibrateTest(chex.TestCase):
  X1 = _random((30, 4), seed=21)
  X2 = _random((30, 4), seed=22, scale=3.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("ema", "ema"), ("running", "running"), ("percentile", "percentile")
  )
  def test_modes(self, mode):
    config = lorap_jax.CalibrationConfig(
      mode=mode, momentum=0.25, percentile=0.1
    )
    calibrate = self.variant(
      lambda state, x: lorap_jax.calibrate(state, x, config)
    )
    state = calibrate(lorap_jax.init_range_state(), jnp.asarray(self.X1))
    state = calibrate(state, jnp.asarray(self.X2))

    if mode == "percentile":
      (lo1, hi1), (lo2, hi2) = (
        torch_percentile_range(self.X1, 0.1),
        torch_percentile_range(self.X2, 0.1),
      )
    else:
      lo1, hi1 = self.X1.min(), self.X1.max()
      lo2, hi2 = self.X2.min(), self.X2.max()
    if mode == "ema":
      want = (lo1 + 0.25 * (lo2 - lo1), hi1 + 0.25 * (hi2 - hi1))
    else:
      want = (min(lo1, lo2), max(hi1, hi2))
    assert bool(state.initialized)
    chex.assert_trees_all_close((state.lo, state.hi), want, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked(self):
    config = lorap_jax.CalibrationConfig(mode="running")
    mask = self.X1 < 1.0
    state = self.variant(
      lambda x, m: lorap_jax.calibrate(
        lorap_jax.init_range_state(), x, config, m
      )
    )(jnp.asarray(self.X1), jnp.asarray(mask))
    chex.assert_trees_all_close(
      (state.lo, state.hi), (self.X1[mask].min(), self.X1[mask].max()), atol=0
    )

  def test_calibration_is_outside_the_gradient(self):
    config = lorap_jax.CalibrationConfig(mode="ema")
    grad = jax.grad(
      lambda x: lorap_jax.calibrate(lorap_jax.init_range_state(), x, config).hi
    )(jnp.asarray(self.X1))
    chex.assert_trees_all_close(grad, np.zeros_like(self.X1), atol=0)

  def test_unknown_mode(self):
    config = lorap_jax.CalibrationConfig(mode="median")
    with pytest.raises(ValueError, match="calibration='median' is not one of"):
      lorap_jax.calibrate(lorap_jax.init_range_state(), jnp.ones(3), config)
