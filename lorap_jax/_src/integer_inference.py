"""Integer-only inference of trained quantized GCNs (Jacob et al., 2018).

`export_integer_model` turns a trained plain-QAT or Degree-Quant GCN into
integer codes with per-tensor scales and zero points read from its frozen
range state; `integer_forward` runs it with integer matrix products and
integer aggregation. Plain QAT and Degree-Quant share one inference graph:
Degree-Quant's protective masking is a training-time device, and at
inference every node is quantized.

Every quantization point of the fake-quantized model has a grid (scale s,
zero point z, codes in [qmin, qmax]) and every real value it holds is
`(q - z) * s`. A product or sum of such values is an integer accumulator
times a real scale, and moving it onto the next point's grid is one
multiplication by the real M = s_acc / s_out, done in fixed point:

| step (GCN layer)  | integer work                                          |
|-------------------|-------------------------------------------------------|
| input             | float features -> codes (the float boundary); later   |
|                   | layers: a 2^b-entry table of the previous output code |
| xw                | int32 acc = sum (q_x - z_x)(q_w - z_w); M = s_x s_w / |
|                   | s_xw                                                  |
| message           | (q_xw - z_xw) x M_e, M_e = norm_e s_xw / s_m per edge |
| aggregate         | int32 segment_sum of (q_m - z_m); M = s_m / s_agg     |
| LoRAP (optional)  | codes -> float prompt -> codes on the aggregate grid  |
| bias, output      | int32 acc = (q_agg - z_agg) 2^k + round(b 2^k / s_agg)|
|                   | M = s_agg 2^-k / s_out                                |
| ReLU              | max(q_out, z_out): zero is the code z_out             |
| logits            | (q_out - z_out) s_out, the float boundary             |

Fixed-point multipliers are TFLite's: M = M0 2^(e - 31) with an int32
mantissa M0 in [2^30, 2^31) (`quantize_multiplier`), applied by
`multiply_by_quantized_multiplier`. The 32 x 32 -> 64-bit product is
emulated with 16-bit limbs in uint32 words, so the jitted path needs neither
`jax_enable_x64` nor int64; `multiply_by_quantized_multiplier_reference` is
the int64 numpy oracle. gemmlowp's double rounding (rounding doubling high
multiply, then rounding right shift) is available, but the default is
TFLite's single rounding of the 64-bit product, with the model's own tie
rule applied to the value plus the zero point: double rounding moved 0.7%
of an INT4 Cora layer's codes by one, which compounds over layers.

Choices, where the model leaves room:

- The GCN coefficients norm_e = d_s^-1/2 d_r^-1/2 are real, and a property
  of the graph rather than of the model: they are folded per edge into the
  message point's fixed-point multiplier, computed in float32 from the
  graph (graph preprocessing, like the adjacency itself); the data path
  stays integer.
- The bias is added after the aggregate point, where the accumulator scale
  is s_agg (Jacob et al.'s s_in s_w). A bias rounded to s_agg alone would
  move outputs by up to half an aggregate step, so the accumulator carries k
  extra fractional bits (the largest k <= 16 that keeps it within int32).
- ReLU and the next layer's input point map one code to one code: a table
  of 2^bits entries, built at export (as TFLite tabulates element-wise
  ops) in exact arithmetic with the model's tie rule. Degree-Quant's input
  ranges are grid values of the previous output (scale ratios such as
  15 / 16), so exact ties are common there: the table rounds them by the
  rule, where the float32 fake-quantized model breaks them by rounding
  noise that depends on how XLA compiled it.
- LoRAP's prompt is a small float computation on S_hat (a softmax), as in
  the paper's inference: the one float island, run by the fused prompt op
  from codes to codes (`lorap_prompt(..., output="codes")`). GPF and
  GPF-plus act on the float input features before they are quantized.
- INT4 (and narrower) codes are stored packed two per byte (`pack_int4`).

Grids, weight codes and tables are computed under `jax.jit` with the bit
width traced, as in `eval_step`: XLA may divide by a reciprocal or fuse a
multiply-add there, and the eager result can differ by one ulp.

Agreement with the fake-quantized model (`eval_step`'s forward, float32):
plain QAT's codes match exactly in our Cora runs. Degree-Quant's percentile
ranges are data values, so some requantizations sit on a half-step up to
float32 noise; the reference breaks those ties by its rounding noise (of
norm_e * xw, for a message), and the integer path, whose products are
exact, treats values within 2^-22 of a half-step as ties
(`multiply_by_quantized_multiplier`): it matches most of them, not all. A
code that differs by one can move later codes by more (one xw step feeds
s_xw / s_m message steps), so a few logits differ by two steps.
"""

import functools
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from lorap_jax._src import layers, models, prompts
from lorap_jax._src import quant_points as qp
from lorap_jax._src import quantization as q
from lorap_jax.kernels.lorap_prompt import lorap_prompt

_INT32_MAX = 2**31 - 1
# Fractional bits of the bias accumulator (see the module docstring).
_MAX_BIAS_SHIFT = 16
GCN_POINTS = frozenset(qp.POINT_NAMES)


# ---------------------------------------------------------------------------
# INT4 packing.
# ---------------------------------------------------------------------------


def pack_int4(codes) -> jax.Array:
  """Packs signed 4-bit codes two per byte (low nibble first).

  Args:
    codes: integer codes in [-8, 7], any shape (flattened, row-major; an odd
      count is padded with one zero nibble).

  Returns:
    uint8 [ceil(codes.size / 2)].

  Examples:
    >>> pack_int4(jnp.array([1, -1, -8]))
    Array([241,   8], dtype=uint8)
  """
  flat = jnp.ravel(jnp.asarray(codes)).astype(jnp.int32)
  flat = jnp.pad(flat, (0, flat.shape[0] % 2))
  nibbles = (flat & 0xF).astype(jnp.uint8)  # Two's complement, 4 bits.
  return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `pack_int4`: int8 codes in [-8, 7] of the given shape.

  Args:
    packed: uint8 [ceil(prod(shape) / 2)].
    shape: the shape of the packed tensor.

  Returns:
    int8 codes, `shape`.
  """
  size = math.prod(shape)
  low = (packed & 0xF).astype(jnp.int8)
  high = (packed >> 4).astype(jnp.int8)
  nibbles = jnp.stack([low, high], axis=-1).reshape(-1)[:size]
  # Sign extension of a 4-bit two's-complement value: (n ^ 8) - 8.
  return ((nibbles ^ 8) - 8).reshape(shape)


@flax.struct.dataclass
class IntegerTensor:
  """Integer codes of a tensor: int8 / int16, or INT4 packed in uint8.

  Attributes:
    data: int8 (bits 5..8) or int16 (bits 9..16) codes of `shape`, or uint8
      [ceil(size / 2)] with two codes per byte (bits <= 4).
    shape: static shape of the tensor.
    bits: static bit width of the codes.
  """

  data: jax.Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  bits: int = flax.struct.field(pytree_node=False)

  @classmethod
  def from_codes(cls, codes, bits: int) -> "IntegerTensor":
    """Stores codes (any integer-valued array) in the narrowest form."""
    codes = jnp.asarray(codes)
    if bits <= 4:
      data = pack_int4(codes)
    else:
      data = codes.astype(jnp.int8 if bits <= 8 else jnp.int16)
    return cls(data=data, shape=tuple(codes.shape), bits=bits)

  def codes(self) -> jax.Array:
    """The codes as int8 / int16, `shape`."""
    if self.bits <= 4:
      return unpack_int4(self.data, self.shape)
    return self.data


# ---------------------------------------------------------------------------
# Fixed-point multipliers (TFLite / gemmlowp).
# ---------------------------------------------------------------------------


class FixedPointMultiplier(NamedTuple):
  """A real multiplier M = multiplier * 2^(shift - 31), both int32.

  `multiplier` is in [2^30, 2^31) (0 for M = 0); `shift` is TFLite's
  exponent: positive shifts left before the high multiply, negative shifts
  right after it. Fields broadcast against the multiplied tensor.
  """

  multiplier: jax.Array
  shift: jax.Array


def quantize_multiplier(real) -> FixedPointMultiplier:
  """TFLite's `QuantizeMultiplier` on the host, in float64.

  Args:
    real: non-negative multipliers, any shape (numpy or concrete arrays).

  Returns:
    int32 numpy fields of `real`'s shape. Multipliers below 2^-32 become
    zero (they move no int32 value by even one).

  Examples:
    >>> m = quantize_multiplier(0.75)
    >>> int(m.multiplier), int(m.shift)   # 0.75 = (3 * 2^29) * 2^(0 - 31)
    (1610612736, 0)
  """
  real = np.asarray(real, np.float64)
  if np.any(real < 0) or not np.all(np.isfinite(real)):
    raise ValueError(f"multipliers must be finite and >= 0, got {real}")
  mantissa, exponent = np.frexp(real)
  m0 = np.round(mantissa * 2.0**31).astype(np.int64)
  carry = m0 == 2**31  # Rounded up to the next power of two.
  m0 = np.where(carry, m0 // 2, m0)
  exponent = np.where(carry, exponent + 1, exponent)
  tiny = (exponent < -31) | (real == 0)
  m0 = np.where(tiny, 0, m0)
  exponent = np.where(tiny, 0, exponent)
  if np.any(exponent > 30):
    raise ValueError(f"multipliers must be below 2^30, got {real.max()}")
  return FixedPointMultiplier(
    m0.astype(np.int32), np.asarray(exponent, np.int32)
  )


def _quantize_multiplier_f32(real: jax.Array) -> FixedPointMultiplier:
  """`quantize_multiplier` in float32 on the device (jittable).

  float32 has a 24-bit mantissa, so the fixed-point value is exactly the
  float32 multiplier (mantissa * 2^31 is exact and below 2^31).
  """
  real = jnp.asarray(real, jnp.float32)
  mantissa, exponent = jnp.frexp(real)
  m0 = jnp.round(mantissa * 2.0**31).astype(jnp.int32)
  tiny = (exponent < -31) | (real == 0)
  return FixedPointMultiplier(
    jnp.where(tiny, 0, m0), jnp.where(tiny, 0, exponent).astype(jnp.int32)
  )


# Requantization roundings: single rounding of the exact product with ties
# to even (torch.round), away from zero (A2Q) or up (TFLite's
# TFLITE_SINGLE_ROUNDING); or gemmlowp's double rounding.
REQUANTIZATION_MODES = ("half_even", "half_away", "half_up", "gemmlowp")
# Ties within 2^-22 of the value (about 4 float32 ulps, the reach of the
# reference's own rounding): see `multiply_by_quantized_multiplier`.
FLOAT32_TIE_BITS = 22


def _scale_multiplier(
  real: jax.Array, multiplier: FixedPointMultiplier
) -> FixedPointMultiplier:
  """The fixed-point product of float32 reals and a multiplier (jittable).

  A float32 value is exact in fixed point (24 of the mantissa's 31 bits),
  so the product of the mantissas (62 bits) is rounded once, to 31 bits:
  norm_e * s_xw / s_m to 2^-31, finer than a float32 product.

  Args:
    real: float32 >= 0, any shape.
    multiplier: a scalar fixed-point multiplier.

  Returns:
    The product, `real`'s shape.
  """
  a = _quantize_multiplier_f32(real)
  m0 = jnp.asarray(multiplier.multiplier, jnp.int32)
  # The mantissa product P is in [2^60, 2^62): P / 2^31 is in [2^29, 2^31].
  high = _multiply_round_shift(a.multiplier, m0, jnp.int32(31))
  low = _multiply_round_shift(a.multiplier, m0, jnp.int32(30))
  overflow = high < 0  # Rounded up to 2^31, which wraps in int32.
  use_low = (high < 2**30) & ~overflow
  mantissa = jnp.where(use_low, low, jnp.where(overflow, 2**30, high))
  shift = a.shift + multiplier.shift - use_low + overflow
  zero = (a.multiplier == 0) | (m0 == 0) | (shift < -31)
  return FixedPointMultiplier(
    jnp.where(zero, 0, mantissa).astype(jnp.int32),
    jnp.where(zero, 0, shift).astype(jnp.int32),
  )


def _as_uint32(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)


# A 64-bit unsigned value as a (high, low) pair of uint32 words.
_U64 = tuple[jax.Array, jax.Array]


def _add64(x: _U64, y: _U64) -> _U64:
  low = x[1] + y[1]
  return x[0] + y[0] + (low < x[1]).astype(jnp.uint32), low


def _sub64(x: _U64, y: _U64) -> _U64:
  """x - y for x >= y."""
  return x[0] - y[0] - (x[1] < y[1]).astype(jnp.uint32), x[1] - y[1]


def _shr64(x: _U64, s: jax.Array) -> _U64:
  """x >> s for s (uint32) in [0, 63]."""
  high, low = x
  small = s < 32
  s_small = jnp.where(small, s, 0)
  # (high << (32 - s)) for s in [1, 31]; s = 0 takes nothing from high.
  spill = jnp.where(s_small == 0, 0, high << ((32 - s_small) & 31))
  shifted_low = jnp.where(
    small, (low >> s_small) | spill, high >> (jnp.clip(s, 32, 63) - 32)
  )
  shifted_high = jnp.where(small, high >> s_small, 0)
  return shifted_high.astype(jnp.uint32), shifted_low.astype(jnp.uint32)


def _pow2_64(e: jax.Array) -> _U64:
  """2^e for e (uint32) in [0, 63]."""
  one, zero = jnp.uint32(1), jnp.uint32(0)
  low = jnp.where(e < 32, one << jnp.minimum(e, 31), zero)
  high = jnp.where(e >= 32, one << (jnp.clip(e, 32, 63) - 32), zero)
  return high, low


def _less64(x: _U64, y: _U64) -> jax.Array:
  return (x[0] < y[0]) | ((x[0] == y[0]) & (x[1] < y[1]))


def _product_magnitude(a: jax.Array, b: jax.Array):
  """|a| b as a 64-bit pair, and a < 0.

  Built from 16-bit limbs: each partial product is below 2^32, so neither
  int64 nor `jax_enable_x64` is needed.
  """
  a = jnp.asarray(a, jnp.int32)
  negative = a < 0
  # |-2^31| wraps to -2^31 in int32, which is 2^31 as uint32: exact.
  a_mag = _as_uint32(jnp.where(negative, -a, a))
  b_mag = _as_uint32(jnp.asarray(b, jnp.int32))
  mask16 = jnp.uint32(0xFFFF)
  a0, a1 = a_mag & mask16, a_mag >> 16
  b0, b1 = b_mag & mask16, b_mag >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & mask16) + (p10 & mask16)  # < 3 * 2^16.
  low = (p00 & mask16) | ((mid & mask16) << 16)
  high = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return (high, low), negative


def _multiply_round_shift(
  a,
  b,
  t,
  rounding: str = "half_up",
  tie_bits: int | None = None,
  offset=0,
) -> jax.Array:
  """round(a b / 2^t + offset) in int32, the 64-bit product rounded once.

  Ties go by `rounding`, applied to the value plus the integer `offset`
  (a zero point: its parity and sign change which way a tie goes). With
  `tie_bits`, a product within |a b| 2^-tie_bits of a half-step counts as a
  tie (see `multiply_by_quantized_multiplier`).

  Args:
    a: int32, any shape.
    b: int32 in [0, 2^31), broadcasting against `a`.
    t: int32 in [1, 62], broadcasting against `a`.
    rounding: "half_up" (floor((ab + 2^(t-1)) / 2^t), TFLite and gemmlowp),
      "half_even" or "half_away".
    tie_bits: the relative width of a tie, or None for exact ties only.
    offset: int32 added before rounding, broadcasting against `a`.

  Returns:
    int32, the broadcast shape; the caller keeps the result within int32.
  """
  product, negative = _product_magnitude(a, b)
  t = _as_uint32(jnp.asarray(t, jnp.int32))
  t = jnp.broadcast_to(t, product[0].shape)
  half = _pow2_64(t - 1)
  one = (jnp.zeros_like(t), jnp.ones_like(t))
  # The tie window e: ties are remainders r with |r - 2^(t-1)| <= e. A
  # quarter step at most, so that it never swallows ordinary values.
  window = (jnp.zeros_like(t), jnp.zeros_like(t))
  if tie_bits is not None:
    window = _shr64(product, jnp.full_like(t, tie_bits))
    quarter = _shr64(half, jnp.ones_like(t))
    limit = _less64(quarter, window)
    window = tuple(
      jnp.where(limit, qw, w) for qw, w in zip(quarter, window, strict=True)
    )
  # Rounded with ties up, floor((P + h + e) / 2^t), and with ties down,
  # floor((P + h - 1 - e) / 2^t); they differ exactly at (near-)ties.
  up = _shr64(_add64(_add64(product, half), window), t)[1]
  down = _shr64(_sub64(_add64(product, half), _add64(one, window)), t)[1]
  up = jax.lax.bitcast_convert_type(up, jnp.int32)
  down = jax.lax.bitcast_convert_type(down, jnp.int32)
  # The signed neighbours of a tie, A + 1 (ceiling) and A (floor); equal
  # away from ties.
  ceiling = jnp.where(negative, -down, up) + offset
  floor = jnp.where(negative, -up, down) + offset
  if rounding == "half_up":
    return ceiling
  if rounding == "half_away":  # A + 1/2 (offset included) is >= 0 iff A is.
    return jnp.where(floor >= 0, ceiling, floor)
  return jnp.where((ceiling & 1) == 0, ceiling, floor)  # half_even.


def saturating_rounding_doubling_high_mul(
  a: jax.Array, b: jax.Array
) -> jax.Array:
  """gemmlowp's `SaturatingRoundingDoublingHighMul` for b >= 0, int32 only.

  The high 32 bits of 2ab, rounded as gemmlowp rounds: (ab + nudge) / 2^31
  truncated to zero with nudge 2^30 (or 1 - 2^30 for a negative product),
  which is floor((ab + 2^30) / 2^31). b >= 0 (a multiplier mantissa) rules
  out gemmlowp's one saturating case, a = b = -2^31.

  Args:
    a: int32, any shape.
    b: int32 in [0, 2^31), broadcasting against `a`.

  Returns:
    int32, the broadcast shape.
  """
  return _multiply_round_shift(a, b, jnp.int32(31), "half_up")


def rounding_divide_by_pot(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """gemmlowp's `RoundingDivideByPOT`: x / 2^exponent, ties away from zero.

  Args:
    x: int32, any shape.
    exponent: int32 in [0, 31], broadcasting against `x`.

  Returns:
    int32, the broadcast shape.
  """
  x = jnp.asarray(x, jnp.int32)
  exponent = jnp.asarray(exponent, jnp.int32)
  # 2^exponent - 1 in uint32, so exponent 31 does not overflow.
  mask = jax.lax.bitcast_convert_type(
    jnp.left_shift(jnp.uint32(1), exponent.astype(jnp.uint32)) - 1,
    jnp.int32,
  )
  remainder = x & mask
  threshold = (mask >> 1) + (x < 0).astype(jnp.int32)
  return (x >> exponent) + (remainder > threshold).astype(jnp.int32)


def _check_requantization(rounding: str) -> None:
  if rounding not in REQUANTIZATION_MODES:
    raise ValueError(
      f"rounding={rounding!r} is not one of {REQUANTIZATION_MODES}"
    )


def multiply_by_quantized_multiplier(
  x: jax.Array,
  multiplier: FixedPointMultiplier,
  *,
  rounding: str = "half_up",
  tie_bits: int | None = None,
  offset=0,
) -> jax.Array:
  """round(x * M) + offset in fixed point, after TFLite's
  `MultiplyByQuantizedMultiplier`.

  Jittable, int32 throughout (the 64-bit product is emulated). Roundings:

  - "half_up" (TFLite's `TFLITE_SINGLE_ROUNDING`): the 64-bit product
    x * M0 shifted right by 31 - shift once, ties up. "half_even" and
    "half_away" are the same single rounding with the tie rules of the
    fake quantizer (`quantization.round_to_integer`), applied, as there, to
    the value plus `offset` (a grid's zero point: round(v + z) differs from
    round(v) + z at a tie when z is odd, or of the other sign).
  - "gemmlowp" (TFLite's original reference): the rounding doubling high
    multiply, then a rounding right shift by -shift (ties away from zero),
    then `offset`. The first rounding leaves an error of up to half a unit
    of 2^-right codes, so for small accumulators and large right shifts
    (x = 14, M = 0.105: 11.79 -> 12, then 12 / 8 = 1.5 -> 2, not
    round(1.47) = 1) it lands one code away from round(x * M).

  `tie_bits` widens a tie to the products within |x M| 2^-tie_bits of a
  half-step (at most a quarter step). M comes from float32 scales, so it is
  known to about 2^-23 only; where the exact M would put x M on a half-step
  (a ratio of scales that is a simple fraction, as Degree-Quant's
  percentile ranges give), the float32 reference computes the half-step
  itself and applies its tie rule, and so does this.

  x is first saturated to |x| < 2^31 / 2^max(shift, 0), so that neither a
  left shift nor the product leaves int32.

  Args:
    x: int32 accumulators, any shape.
    multiplier: the fixed-point M; fields broadcast against `x`.
    rounding: one of `REQUANTIZATION_MODES`.
    tie_bits: relative width of a tie (single rounding only); None: exact
      ties only.
    offset: int32 added to the result (and, for single rounding, before
      the tie rule), broadcasting against `x`.

  Returns:
    int32, the broadcast shape.

  Examples:
    >>> m = quantize_multiplier(0.25)
    >>> x = jnp.array([6, -6, 7])
    >>> multiply_by_quantized_multiplier(x, m)
    Array([ 2, -1,  2], dtype=int32)
    >>> multiply_by_quantized_multiplier(x, m, rounding="half_even")
    Array([ 2, -2,  2], dtype=int32)
    >>> multiply_by_quantized_multiplier(x, m, rounding="half_even", offset=1)
    Array([2, 0, 3], dtype=int32)
  """
  _check_requantization(rounding)
  x = jnp.asarray(x, jnp.int32)
  offset = jnp.asarray(offset, jnp.int32)
  m0 = jnp.asarray(multiplier.multiplier, jnp.int32)
  shift = jnp.asarray(multiplier.shift, jnp.int32)
  left = jnp.maximum(shift, 0)
  limit = jnp.right_shift(jnp.int32(_INT32_MAX), left)
  x = jnp.clip(x, -limit - 1, limit)
  if rounding != "gemmlowp":
    return _multiply_round_shift(x, m0, 31 - shift, rounding, tie_bits, offset)
  if tie_bits is not None:
    raise ValueError("tie_bits applies to single rounding, not gemmlowp's")
  high = saturating_rounding_doubling_high_mul(jnp.left_shift(x, left), m0)
  return rounding_divide_by_pot(high, jnp.maximum(-shift, 0)) + offset


def multiply_by_quantized_multiplier_reference(
  x,
  multiplier: FixedPointMultiplier,
  *,
  rounding: str = "half_up",
  tie_bits: int | None = None,
  offset=0,
) -> np.ndarray:
  """The int64 numpy oracle of `multiply_by_quantized_multiplier`.

  Args:
    x: int32 values, any shape.
    multiplier: the fixed-point M (fields broadcast against `x`).
    rounding: one of `REQUANTIZATION_MODES`.
    tie_bits: relative width of a tie (single rounding only).
    offset: integer added to the result (before the tie rule).

  Returns:
    int32 numpy array, TFLite's / gemmlowp's result bit for bit.
  """
  _check_requantization(rounding)
  x = np.asarray(x, np.int64)
  offset = np.asarray(offset, np.int64)
  m0 = np.asarray(multiplier.multiplier, np.int64)
  shift = np.asarray(multiplier.shift, np.int64)
  left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
  limit = _INT32_MAX >> left
  x = np.clip(x, -limit - 1, limit)
  if rounding != "gemmlowp":
    t = 31 - shift
    product = x * m0  # |x * m0| < 2^62.
    floor = product >> t  # Arithmetic shift: the floor.
    remainder = product - (floor << t)
    half = np.int64(1) << (t - 1)
    window = np.zeros_like(product)
    if tie_bits is not None:
      window = np.minimum(np.abs(product) >> tie_bits, half >> 1)
    tie = np.abs(remainder - half) <= window
    # A tie lies between floor and floor + 1 (value plus offset).
    lower = floor + offset
    tied = {
      "half_up": lower + 1,
      "half_away": np.where(lower >= 0, lower + 1, lower),
      "half_even": lower + (lower % 2),
    }[rounding]
    out = np.where(tie, tied, lower + (remainder > half))
    return out.astype(np.int32)
  product = (x << left) * m0
  nudge = np.where(product >= 0, 1 << 30, 1 - (1 << 30))
  total = product + nudge
  # C++ division of int64 truncates toward zero.
  high = np.where(total >= 0, total >> 31, -((-total) >> 31))
  mask = (np.int64(1) << right) - 1
  remainder = high & mask
  threshold = (mask >> 1) + (high < 0)
  out = (high >> right) + (remainder > threshold) + offset
  return out.astype(np.int32)


# ---------------------------------------------------------------------------
# The exported model.
# ---------------------------------------------------------------------------


class IntegerGrid(NamedTuple):
  """A quantization point's per-tensor grid: real = (code - z) * scale."""

  scale: jax.Array  # float32 []
  zero_point: jax.Array  # int32 []


class IntegerGCNLayer(NamedTuple):
  """One exported GCN layer (see the table in the module docstring).

  Attributes:
    input: grid of the layer's input point.
    input_table: [2^bits] int8 / int16, the previous layer's output code
      (offset by -qmin) -> this input point's code, with the ReLU between
      them (None in the first layer, whose input is quantized from float
      features).
    weight: the kernel's codes, [f_in, f_out].
    weight_grid: the kernel's grid.
    xw: grid of X W; xw_multiplier: s_x s_w / s_xw.
    message: grid of the messages; message_multiplier: s_xw / s_m, the
      per-edge multiplier's model part (times norm_e).
    aggregate: grid of the aggregate; aggregate_multiplier: s_m / s_agg.
    prompt: LoRAP's float parameters (w_phi, b_phi, p_a, p_b) or None.
    bias: int32 [f_out], the bias at scale s_agg 2^-bias_shift.
    bias_shift: int32 [], k, the accumulator's extra fractional bits.
    output: grid of the output point; output_multiplier: s_agg 2^-k / s_out.
  """

  input: IntegerGrid
  input_table: jax.Array | None
  weight: IntegerTensor
  weight_grid: IntegerGrid
  xw: IntegerGrid
  xw_multiplier: FixedPointMultiplier
  message: IntegerGrid
  message_multiplier: FixedPointMultiplier
  aggregate: IntegerGrid
  aggregate_multiplier: FixedPointMultiplier
  prompt: dict | None
  bias: jax.Array
  bias_shift: jax.Array
  output: IntegerGrid
  output_multiplier: FixedPointMultiplier


@flax.struct.dataclass
class IntegerModel:
  """An exported integer-only model (a pytree; static fields are Python).

  Attributes:
    layers: the message-passing layers, in order.
    node_prompt: GPF / GPF-plus parameters (applied to float features
      before the first input point), or None.
    bits: bit width of every point.
    rounding: the model's rounding mode, used where float values meet a grid
      (input features, weights, bias, the LoRAP island).
    architecture: "gcn".
    node_prompt_kind: "gpf", "gpf-plus" or None.
    num_prompts: GPF-plus's k.
    prompt_implementation: the fused prompt's implementation(s).
    requantization: the fixed-point rounding, one of
      `REQUANTIZATION_MODES` (see `multiply_by_quantized_multiplier`).
    tie_bits: relative width of a requantization tie, or None.
  """

  layers: tuple[IntegerGCNLayer, ...]
  node_prompt: dict | None
  bits: int = flax.struct.field(pytree_node=False)
  rounding: str = flax.struct.field(pytree_node=False)
  architecture: str = flax.struct.field(pytree_node=False, default="gcn")
  node_prompt_kind: str | None = flax.struct.field(
    pytree_node=False, default=None
  )
  num_prompts: int = flax.struct.field(pytree_node=False, default=10)
  prompt_implementation: Any = flax.struct.field(
    pytree_node=False, default="auto"
  )
  requantization: str = flax.struct.field(
    pytree_node=False, default="half_even"
  )
  tie_bits: int | None = flax.struct.field(
    pytree_node=False, default=FLOAT32_TIE_BITS
  )

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1))

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1


def _variables_and_model(state_or_variables, model, bits):
  """Splits a TrainState (or variables dict) into variables, model, bits."""
  if hasattr(state_or_variables, "variables"):
    state = state_or_variables
    variables = state.variables()
    if model is None:
      # TrainState.apply_fn is the bound `GNN.apply` of its model.
      model = getattr(state.apply_fn, "__self__", None)
    if bits is None:
      bits = state.bits
  else:
    variables = state_or_variables
  if not isinstance(model, models.GNN):
    raise ValueError(
      f"model={model!r} must be the trained GNN (pass model= when exporting "
      "a variables dict)"
    )
  if bits is None:
    raise ValueError("bits must be given when exporting a variables dict")
  bits_array = np.asarray(bits)
  if bits_array.ndim:
    raise ValueError(
      f"bits has shape {bits_array.shape}: export one run at a time (index "
      "a vmapped state first)"
    )
  q.check_bits(bits_array)
  return variables, model, int(bits_array)


def _check_exportable(model: models.GNN, bits: int) -> None:
  quant = model.quant
  if not quant.enabled:
    raise ValueError("an FP32 model has no integer form: train it quantized")
  if quant.a2q is not None or quant.mixq is not None:
    raise ValueError(
      "integer export supports the affine per-tensor quantizers of plain QAT "
      "and Degree-Quant; A2Q and MixQ quantize per channel / per node"
    )
  if model.model.architecture != "gcn" or model.model.task != "node":
    raise ValueError(
      f"integer inference supports node-task GCNs, got "
      f"{model.model.architecture!r} for a {model.model.task!r} task"
    )
  missing = sorted(GCN_POINTS - set(quant.points))
  if missing:
    raise ValueError(
      f"integer-only inference needs every quantization point; {missing} "
      "are off, so those tensors would stay in float"
    )
  if quant.weight_calibration != "current":
    raise ValueError(
      f"weight_calibration={quant.weight_calibration!r}: only 'current' "
      "(the kernel's own range) is exported"
    )
  if bits < 2:
    raise ValueError(f"bits={bits} must be at least 2 for integer inference")
  if model.prompt.uses_lorap and model.prompt.position != "post":
    raise ValueError(
      f"prompt position={model.prompt.position!r}: integer inference runs "
      "LoRAP after the aggregation only ('post')"
    )


def _grid(stats: q.RangeState, bits: int, name: str) -> q.QParams:
  if not bool(stats.initialized):
    raise ValueError(
      f"quantization point {name!r} was never calibrated: train (or "
      "calibrate) the model before exporting it"
    )
  return _affine_grid(stats.lo, stats.hi, jnp.float32(bits))


# Grids and weight codes are computed under jit with the bit width traced,
# as in the model's eval step: XLA turns some divisions into multiplications
# by a reciprocal, which can move a scale by one ulp from the eager result.
@jax.jit
def _affine_grid(lo, hi, bits) -> q.QParams:
  return q.affine_qparams(lo, hi, bits, signed=True)


@functools.partial(jax.jit, static_argnames="rounding")
def _weight_codes(kernel, bits, *, rounding):
  """The weight grid (the kernel's current range) and codes, as the model."""
  lo, hi = q.observe_minmax(jax.lax.stop_gradient(kernel))
  grid = q.affine_qparams(lo, hi, bits, signed=True)
  return grid, q.quantize_to_codes(kernel, grid, rounding=rounding)


def _integer_grid(grid: q.QParams) -> IntegerGrid:
  return IntegerGrid(
    jnp.asarray(grid.scale, jnp.float32),
    jnp.asarray(grid.zero_point).astype(jnp.int32),
  )


def _scale(x) -> float:
  return float(np.asarray(x, np.float32))


def _requantization_table(
  source: q.QParams, target: q.QParams, bits: int, rounding: str
) -> jax.Array:
  """Every code of `source`, ReLU'd, as a code of `target` ([2^bits]).

  Computed in float64, where a small integer times the ratio of two float32
  scales is a half-integer exactly when it is one in exact arithmetic, and
  rounded by the model's tie rule applied to the value plus the zero point,
  as its quantizer does. Degree-Quant's ranges are grid values of the
  previous point, their scale ratios simple fractions (15 / 16), so exact
  ties are common there; float32 arithmetic breaks them by rounding noise,
  one way or the other depending on how XLA compiled the model, which a
  table cannot follow.
  """
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  codes = np.arange(qmin, qmax + 1, dtype=np.float64)
  zero_out, scale_out, zero_in, scale_in = (
    np.float64(np.asarray(v, np.float32))
    for v in (
      source.zero_point,
      source.scale,
      target.zero_point,
      target.scale,
    )
  )
  real = np.maximum(codes - zero_out, 0.0) * scale_out  # ReLU, dequantized.
  value = real / scale_in + zero_in
  if rounding == "half_even":
    rounded = np.round(value)
  else:  # "half_away", A2Q's sign(x) floor(|x| + 0.5).
    rounded = np.sign(value) * np.floor(np.abs(value) + 0.5)
  return jnp.asarray(np.clip(rounded, qmin, qmax), _code_dtype(bits))


def _bias_shift(bias: np.ndarray, agg_scale: float, bits: int) -> int:
  """The largest k <= 16 keeping (q - z) 2^k + b 2^k / s_agg within 2^30."""
  span = 2.0**bits + float(np.max(np.abs(bias), initial=0.0)) / agg_scale
  k = int(np.floor(np.log2(2.0**30 / span)))
  if k < 0:
    raise ValueError(
      f"the bias ({np.max(np.abs(bias))}) is too large for an int32 "
      f"accumulator at the aggregate scale {agg_scale}"
    )
  return min(k, _MAX_BIAS_SHIFT)


def export_integer_model(
  state_or_variables,
  model: models.GNN | None = None,
  *,
  bits=None,
  requantization: str | None = None,
  tie_bits: int | None = FLOAT32_TIE_BITS,
) -> IntegerModel:
  """Exports a trained plain-QAT or Degree-Quant GCN to integer form.

  Grids come from the frozen range state (what evaluation uses), weights
  from their current min/max, exactly as the model's eval forward builds
  them.

  Args:
    state_or_variables: a `TrainState` (e.g. from `train_and_evaluate`'s
      `summary["states"]`), or its `variables()` dict.
    model: the `GNN` (None: read from the state's `apply_fn`).
    bits: the bit width (None: the state's).
    requantization: the fixed-point rounding of every requantization, one
      of `REQUANTIZATION_MODES`; None: single rounding with the model's own
      tie rule (its `QuantConfig.rounding`), which mirrors the fake
      quantizers most closely.
    tie_bits: products within 2^-tie_bits of a half-step round as ties
      (None: exact ties only; gemmlowp's rounding needs None).

  Returns:
    The `IntegerModel`.

  Raises:
    ValueError: for models without an integer form (FP32, A2Q, MixQ, GIN,
      GAT, graph tasks, points switched off), uncalibrated points, a
      vmapped (stacked) state or a missing model.
  """
  variables, model, bits = _variables_and_model(state_or_variables, model, bits)
  if requantization is None:
    requantization = model.quant.rounding
  _check_requantization(requantization)
  if requantization == "gemmlowp":
    tie_bits = None
  _check_exportable(model, bits)
  quant = model.quant
  params = jax.device_get(variables["params"])
  stats = jax.device_get(variables[qp.QUANT_STATS])
  n_layers = model.model.num_layers
  exported = []
  previous_output = None
  for i in range(n_layers):
    conv_params, conv_stats = params[f"conv_{i}"], stats[f"conv_{i}"]
    name = f"conv_{i}"
    input_grid = _grid(conv_stats["linear"]["input"], bits, f"{name}/input")
    xw_grid = _grid(conv_stats["linear"]["xw"], bits, f"{name}/xw")
    msg_grid = _grid(conv_stats["message"], bits, f"{name}/message")
    agg_grid = _grid(conv_stats["aggregate"], bits, f"{name}/aggregate")
    out_grid = _grid(conv_stats["output"], bits, f"{name}/output")
    kernel = jnp.asarray(conv_params["linear"]["kernel"], jnp.float32)
    weight_grid, weight_codes = _weight_codes(
      kernel, jnp.float32(bits), rounding=quant.rounding
    )
    s_x, s_w = _scale(input_grid.scale), _scale(weight_grid.scale)
    s_xw, s_m = _scale(xw_grid.scale), _scale(msg_grid.scale)
    s_agg, s_out = _scale(agg_grid.scale), _scale(out_grid.scale)
    bias = np.asarray(conv_params["bias"], np.float32)
    k = _bias_shift(bias, s_agg, bits)
    fine_scale = np.float64(s_agg) * 2.0**-k
    bias_codes = q.round_to_integer(
      jnp.asarray(bias / fine_scale, jnp.float32), quant.rounding
    ).astype(jnp.int32)
    input_table = None
    if previous_output is not None:
      input_table = _requantization_table(
        previous_output, input_grid, bits, quant.rounding
      )
    lorap = params.get(f"lorap_{i}")
    exported.append(
      IntegerGCNLayer(
        input=_integer_grid(input_grid),
        input_table=input_table,
        weight=IntegerTensor.from_codes(weight_codes, bits),
        weight_grid=_integer_grid(weight_grid),
        xw=_integer_grid(xw_grid),
        xw_multiplier=quantize_multiplier(s_x * s_w / s_xw),
        message=_integer_grid(msg_grid),
        message_multiplier=quantize_multiplier(s_xw / s_m),
        aggregate=_integer_grid(agg_grid),
        aggregate_multiplier=quantize_multiplier(s_m / s_agg),
        prompt=None if lorap is None else dict(lorap),
        bias=bias_codes,
        bias_shift=jnp.asarray(k, jnp.int32),
        output=_integer_grid(out_grid),
        output_multiplier=quantize_multiplier(fine_scale / s_out),
      )
    )
    previous_output = out_grid
  node_prompt_kind = model.prompt.node_prompt
  node_prompt = None
  if node_prompt_kind is not None:
    node_prompt = params["gpf" if node_prompt_kind == "gpf" else "gpf_plus"]
  integer_model = IntegerModel(
    layers=tuple(exported),
    node_prompt=node_prompt,
    bits=bits,
    rounding=quant.rounding,
    architecture="gcn",
    node_prompt_kind=node_prompt_kind,
    num_prompts=model.prompt.num_prompts,
    prompt_implementation=model.prompt.implementation,
    requantization=requantization,
    tie_bits=tie_bits,
  )
  return jax.tree.map(jnp.asarray, integer_model)


# ---------------------------------------------------------------------------
# Integer kernels.
# ---------------------------------------------------------------------------


def requantize(
  acc: jax.Array,
  multiplier: FixedPointMultiplier,
  zero_point: jax.Array,
  *,
  qmin: int,
  qmax: int,
  rounding: str = "half_up",
  tie_bits: int | None = None,
) -> jax.Array:
  """Codes of the real value acc * s_acc on a grid: z + acc * M, clipped.

  Args:
    acc: int32 accumulators (at scale s_acc), any shape.
    multiplier: fixed-point M = s_acc / s_grid, broadcasting against `acc`.
    zero_point: the grid's int32 zero point.
    qmin: lowest code.
    qmax: highest code.
    rounding: one of `REQUANTIZATION_MODES`.
    tie_bits: relative width of a tie (`multiply_by_quantized_multiplier`).

  Returns:
    int32 codes in [qmin, qmax], `acc`'s shape.
  """
  codes = multiply_by_quantized_multiplier(
    acc, multiplier, rounding=rounding, tie_bits=tie_bits, offset=zero_point
  )
  return jnp.clip(codes, qmin, qmax)


def integer_matmul(
  x_codes: jax.Array | layers.SparseFeatures,
  x_zero_point: jax.Array,
  w_codes: jax.Array,
  w_zero_point: jax.Array,
) -> jax.Array:
  """sum_k (x - z_x)(w - z_w) in int32, for dense or sparse x codes.

  Dense x uses Jacob et al.'s expansion: one int8 x int8 -> int32 product of
  the raw codes, minus the zero-point terms (row sums of x, column sums of
  w, K z_x z_w). Sparse x (COO codes of the non-zero features; the implicit
  entries are real zeros, i.e. the code z_x) multiplies the non-zeros only.

  Args:
    x_codes: int codes [n, K], or `SparseFeatures` whose values are codes.
    x_zero_point: int32 [], x's zero point.
    w_codes: int codes [K, d].
    w_zero_point: int32 [], w's zero point.

  Returns:
    int32 [n, d].

  Examples:
    >>> x, w = jnp.array([[1, 2]], jnp.int8), jnp.array([[3], [4]], jnp.int8)
    >>> integer_matmul(x, jnp.int32(1), w, jnp.int32(0))
    Array([[4]], dtype=int32)
  """
  x_zero_point = jnp.asarray(x_zero_point, jnp.int32)
  w_zero_point = jnp.asarray(w_zero_point, jnp.int32)
  if isinstance(x_codes, layers.SparseFeatures):
    offsets = x_codes.values.astype(jnp.int32) - x_zero_point
    w_offsets = w_codes.astype(jnp.int32) - w_zero_point
    gathered = offsets[:, None] * w_offsets[x_codes.cols]
    return jax.ops.segment_sum(
      gathered,
      x_codes.rows,
      num_segments=x_codes.shape[0],
      indices_are_sorted=True,
    )
  depth = x_codes.shape[1]
  if not x_codes.dtype == w_codes.dtype == jnp.int8:
    # Wider codes (9..16 bits) multiply as int32.
    x_codes, w_codes = x_codes.astype(jnp.int32), w_codes.astype(jnp.int32)
  # Integer products are exact at any precision, and XLA's GPU GEMM finds no
  # kernel for an int8 dot marked HIGHEST (seen on an H200 under
  # jax_default_matmul_precision="highest"): pin the default.
  acc = jax.lax.dot(
    x_codes,
    w_codes,
    precision=jax.lax.Precision.DEFAULT,
    preferred_element_type=jnp.int32,
  )
  row_sums = jnp.sum(x_codes, axis=1, dtype=jnp.int32)[:, None]
  col_sums = jnp.sum(w_codes, axis=0, dtype=jnp.int32)[None, :]
  return (
    acc
    - w_zero_point * row_sums
    - x_zero_point * col_sums
    + depth * x_zero_point * w_zero_point
  )


def _quantize_features(x, grid: IntegerGrid, bits: int, rounding: str):
  """Float features -> codes on the input grid (the float boundary)."""
  qparams = q.QParams(
    grid.scale,
    grid.zero_point.astype(jnp.float32),
    *(jnp.float32(v) for v in (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)),
  )
  if isinstance(x, layers.SparseFeatures):
    codes = q.quantize_to_codes(x.values, qparams, rounding=rounding)
    return x.replace_values(codes.astype(jnp.int32))
  return q.quantize_to_codes(x, qparams, rounding=rounding).astype(
    _code_dtype(bits)
  )


def _code_dtype(bits: int):
  return jnp.int8 if bits <= 8 else jnp.int16


def _prompt_inputs(model: IntegerModel, x):
  """GPF / GPF-plus on float features, before the first input point."""
  if model.node_prompt_kind is None:
    return x
  if isinstance(x, layers.SparseFeatures):
    x = x.to_dense()
  if model.node_prompt_kind == "gpf":
    module = prompts.GPF()
  else:
    module = prompts.GPFPlus(model.num_prompts)
  return module.apply({"params": model.node_prompt}, x)


class IntegerOutput(NamedTuple):
  """What `integer_forward` returns.

  Attributes:
    codes: int32 [n_nodes, num_classes], the last output point's codes.
    logits: float32 [n_nodes, num_classes], (codes - z_out) * s_out.
  """

  codes: jax.Array
  logits: jax.Array


@jax.jit
def integer_forward(
  integer_model: IntegerModel, graph: jraph.GraphsTuple
) -> IntegerOutput:
  """Integer-only inference of an exported GCN.

  Compiled with `jax.jit` (one program per model structure), so that its
  float boundaries (the input quantizer, the LoRAP island) fuse and round
  as the model's jitted eval step does; no int64 and no `jax_enable_x64`.

  Args:
    integer_model: from `export_integer_model`.
    graph: nodes are float features, dense [n_nodes, f] or
      `SparseFeatures`; senders and receivers hold both directions of every
      edge, without self-loops (as for the model).

  Returns:
    The last layer's output codes and the logits they stand for.
  """
  model = integer_model
  grid_range = dict(
    qmin=model.qmin,
    qmax=model.qmax,
    rounding=model.requantization,
    tie_bits=model.tie_bits,
  )
  x = _prompt_inputs(model, graph.nodes)
  n_nodes = x.shape[0]
  senders, receivers = layers.add_self_loops(
    graph.senders, graph.receivers, n_nodes
  )
  # The graph's real coefficients, computed as the model computes them.
  norm = layers.gcn_normalization(senders, receivers, n_nodes)
  codes, previous = None, None
  for i, layer in enumerate(model.layers):
    if i == 0:
      codes = _quantize_features(x, layer.input, model.bits, model.rounding)
    else:
      # A table of 2^bits codes: the previous output point's code ->
      # this input point's code.
      codes = layer.input_table[codes - model.qmin]
    acc = integer_matmul(
      codes,
      layer.input.zero_point,
      layer.weight.codes(),
      layer.weight_grid.zero_point,
    )
    xw = requantize(acc, layer.xw_multiplier, layer.xw.zero_point, **grid_range)
    edge = _scale_multiplier(norm, layer.message_multiplier)
    edge = FixedPointMultiplier(*(f[:, None] for f in edge))
    messages = requantize(
      (xw - layer.xw.zero_point)[senders],
      edge,
      layer.message.zero_point,
      **grid_range,
    )
    total = jax.ops.segment_sum(
      messages - layer.message.zero_point, receivers, num_segments=n_nodes
    )
    aggregate = requantize(
      total,
      layer.aggregate_multiplier,
      layer.aggregate.zero_point,
      **grid_range,
    )
    if layer.prompt is not None:
      aggregate = _prompt_codes(model, layer, aggregate)
    acc = jnp.left_shift(
      aggregate - layer.aggregate.zero_point, layer.bias_shift
    )
    acc = acc + layer.bias[None, :]
    codes = requantize(
      acc,
      layer.output_multiplier,
      layer.output.zero_point,
      **grid_range,
    )
    if i < len(model.layers) - 1:
      codes = jnp.maximum(codes, layer.output.zero_point)  # ReLU.
    previous = layer.output
  logits = (codes - previous.zero_point).astype(jnp.float32) * previous.scale
  return IntegerOutput(codes, logits)


def _prompt_codes(model: IntegerModel, layer: IntegerGCNLayer, aggregate):
  """LoRAP, the float island: codes -> S_hat -> prompt -> codes."""
  grid = layer.aggregate
  qparams = q.QParams(
    grid.scale,
    grid.zero_point.astype(jnp.float32),
    jnp.float32(model.qmin),
    jnp.float32(model.qmax),
  )
  p = layer.prompt
  return lorap_prompt(
    aggregate,
    p["w_phi"],
    p["b_phi"],
    p["p_a"],
    p["p_b"],
    qparams,
    input_scale=grid.scale,
    input_zero_point=grid.zero_point.astype(jnp.float32),
    output="codes",
    codes_dtype=jnp.int32,
    rounding=model.rounding,
    implementation=model.prompt_implementation,
  )


# ---------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------


def model_memory_kb(tree) -> float:
  """KB (1024 bytes) of every array in `tree`, as stored.

  For an `IntegerModel`: weight codes (packed for INT4), int32 biases,
  scales, zero points and multipliers, and float prompt parameters. For a
  float parameter tree: 4 bytes per float32 parameter.
  """
  return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)) / 1024


class FeatureMemory(NamedTuple):
  """Node feature memory in KB.

  Attributes:
    tensors_kb: per stored tensor: each layer's input [n_nodes, f_in], then
      the logits [n_nodes, num_classes].
    total_kb: their sum.
    largest_kb: the largest of them.
  """

  tensors_kb: tuple[float, ...]
  total_kb: float
  largest_kb: float


def feature_memory_kb(
  integer_model: IntegerModel, n_nodes: int, *, bits: int | None = None
) -> FeatureMemory:
  """Memory of the node features stored between layers, dense, in KB.

  Args:
    integer_model: gives the layer widths.
    n_nodes: number of nodes.
    bits: storage width (None: the model's; 32 for FP32). Codes of 4 bits
      or fewer pack two per byte, 5..8 take a byte, 9..16 two.

  Returns:
    The `FeatureMemory`.
  """
  bits = integer_model.bits if bits is None else bits
  stored_bits = 32 if bits > 16 else 4 if bits <= 4 else 8 if bits <= 8 else 16
  widths = [layer.weight.shape[0] for layer in integer_model.layers]
  widths.append(integer_model.layers[-1].weight.shape[1])
  tensors = tuple(
    math.ceil(n_nodes * width * stored_bits / 8) / 1024 for width in widths
  )
  return FeatureMemory(tensors, sum(tensors), max(tensors))
