"""Fake quantization: numerics, straight-through estimators, calibration.

The layout follows AQT: *numerics* (integer grid, rounding) are pure functions,
*calibration* turns observed ranges into a scale and zero point and lives in an
explicit `RangeState`, and the gradient rule is one `jax.custom_vjp`.

Bucket arithmetic of the affine quantizer with `b` bits (Degree-Quant's
`IntegerQuantizer`, `frameworks.md` section 1.1):

| quantity         | value                                              |
|------------------|----------------------------------------------------|
| qmin, qmax       | unsigned: 0, 2^b - 1; signed: -2^(b-1), 2^(b-1) - 1 |
| range            | [min(lo, 0), max(hi, 0)]: zero is always on the grid |
| scale s          | (hi - lo) / (qmax - qmin), at least float32 eps    |
| zero point z     | clip(qmin - round(lo / s), qmin, qmax)             |
| code q           | clip(round(x / s + z), qmin, qmax)                 |
| dequantized      | (q - z) * s                                        |

The symmetric quantizer (A2Q) has z = 0 and codes in [-(2^(b-1) - 1),
2^(b-1) - 1]. Bit widths are arrays everywhere, so they can be traced, swept
with `vmap` and differentiated by learned-bit frameworks.
"""

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

RoundingMode = Literal["half_even", "half_away"]
GradientMode = Literal["identity", "clipped", "clipped_inner"]
CalibrationMode = Literal["ema", "running", "percentile"]

ROUNDING_MODES = ("half_even", "half_away")
GRADIENT_MODES = ("identity", "clipped", "clipped_inner")
CALIBRATION_MODES = ("ema", "running", "percentile")
MIN_BITS, MAX_BITS = 1, 16

_EPS = float(np.finfo(np.float32).eps)


def per_row(mask: jax.Array | None, ndim: int) -> jax.Array | None:
  """Broadcasts a [rows] mask against a [rows, ...] tensor of `ndim` dims."""
  if mask is None:
    return None
  return mask.reshape(mask.shape + (1,) * (ndim - 1))


def check_bits(bits) -> None:
  """Refuses bit widths that are not integers in 1..16 (concrete values only).

  Args:
    bits: a Python number or a concrete array of bit widths. Traced values are
      not checked (they cannot be inspected without a host sync).

  Raises:
    ValueError: if any bit width is not an integer in [1, 16].
  """
  if isinstance(bits, jax.core.Tracer):
    return
  values = np.asarray(bits)
  # Strings ("4" from a config file), None and objects are not bit widths.
  if values.dtype.kind not in "biuf":
    raise ValueError(
      f"bits={bits!r} must be integers in {MIN_BITS}..{MAX_BITS}"
    )
  values = values.astype(np.float64)
  bad = (values != np.round(values)) | (values < MIN_BITS) | (values > MAX_BITS)
  if np.any(bad):
    raise ValueError(
      f"bits={values[bad].tolist()} must be integers in {MIN_BITS}..{MAX_BITS}"
    )


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  """Refuses `value` unless it is one of `allowed`, naming the setting."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {allowed}")


# ---------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------


def integer_range(bits, *, signed: bool) -> tuple[jax.Array, jax.Array]:
  """The integer grid [qmin, qmax] of a `bits`-wide code, as float32 arrays.

  Args:
    bits: bit width, any shape (broadcasts with the tensor's scale).
    signed: two's-complement range instead of [0, 2^b - 1].

  Returns:
    `(qmin, qmax)` with the shape of `bits`.
  """
  bits = jnp.asarray(bits, jnp.float32)
  levels = jnp.exp2(bits)
  if signed:
    qmin = -levels / 2
    return qmin, qmin + levels - 1
  return jnp.zeros_like(levels), levels - 1


def round_to_integer(x: jax.Array, rounding: RoundingMode) -> jax.Array:
  """Rounds to integers: half to even (torch.round) or half away from zero.

  Examples:
    >>> round_to_integer(jnp.array([0.5, 1.5, -0.5]), "half_even")
    Array([ 0.,  2., -0.], dtype=float32)
    >>> round_to_integer(jnp.array([0.5, 1.5, -0.5]), "half_away")
    Array([ 1.,  2., -1.], dtype=float32)
  """
  if rounding == "half_even":
    return jnp.round(x)
  if rounding == "half_away":
    # A2Q's rule: sign(x) * floor(|x| + 0.5).
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)
  raise ValueError(f"rounding={rounding!r} is not one of {ROUNDING_MODES}")


class QParams(NamedTuple):
  """Everything a fake quantizer needs: scale, zero point and integer grid.

  All fields broadcast against the quantized tensor (scalars for per-tensor
  quantization, `[features]` for per-channel).
  """

  scale: jax.Array
  zero_point: jax.Array
  qmin: jax.Array
  qmax: jax.Array


def affine_qparams(lo, hi, bits, *, signed: bool = False) -> QParams:
  """Scale and zero point of the affine quantizer for the range [lo, hi].

  Degree-Quant's rules: the range is widened to contain zero (so a zero
  feature stays exactly zero), the scale is floored at float32 eps, and an
  empty range gives scale 1 and zero point 0.

  Args:
    lo: lower end of the observed range.
    hi: upper end of the observed range.
    bits: bit width.
    signed: use the signed integer grid (this only shifts the codes).

  Returns:
    The `QParams` of the grid.
  """
  qmin, qmax = integer_range(bits, signed=signed)
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  empty = hi == lo
  scale = jnp.where(empty, 1.0, jnp.maximum((hi - lo) / (qmax - qmin), _EPS))
  zero_point = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
  zero_point = jnp.where(empty, 0.0, zero_point)
  return QParams(scale, zero_point, qmin, qmax)


def symmetric_qparams(abs_max, bits) -> QParams:
  """Signed symmetric grid with levels +-(2^(b-1) - 1) covering `abs_max`."""
  qmax = jnp.exp2(jnp.asarray(bits, jnp.float32) - 1) - 1
  # One bit leaves no level but zero; keep the scale finite all the same.
  scale = jnp.maximum(jnp.asarray(abs_max, jnp.float32), _EPS)
  scale = scale / jnp.maximum(qmax, 1.0)
  return QParams(scale, jnp.zeros_like(scale), -qmax, qmax)


# ---------------------------------------------------------------------------
# The straight-through estimator.
# ---------------------------------------------------------------------------


def _codes(x, scale, zero_point, rounding):
  return round_to_integer(x / scale + zero_point, rounding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fake_quant(x, qparams: QParams, rounding, gradient):
  del gradient  # Only the backward pass reads it.
  codes = _codes(x, qparams.scale, qparams.zero_point, rounding)
  codes = jnp.clip(codes, qparams.qmin, qparams.qmax)
  return ((codes - qparams.zero_point) * qparams.scale).astype(x.dtype)


def _fake_quant_fwd(x, qparams, rounding, gradient):
  out = _fake_quant(x, qparams, rounding, gradient)
  if gradient == "identity":
    return out, None
  codes = _codes(x, qparams.scale, qparams.zero_point, rounding)
  if gradient == "clipped":
    inside = (codes >= qparams.qmin) & (codes <= qparams.qmax)
  else:  # "clipped_inner": the boundary codes stop the gradient too.
    inside = (codes > qparams.qmin) & (codes < qparams.qmax)
  return out, inside


def _fake_quant_bwd(rounding, gradient, inside, g):
  del rounding
  # The grid is calibration state, not a learned quantity: no cotangent.
  no_grad = None
  if gradient == "identity":
    return g, no_grad
  return jnp.where(inside, g, jnp.zeros_like(g)), no_grad


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
  x: jax.Array,
  qparams: QParams,
  *,
  rounding: RoundingMode = "half_even",
  gradient: GradientMode = "identity",
) -> jax.Array:
  """Quantizes and dequantizes `x` on the grid `qparams`.

  The backward pass is the straight-through estimator: the identity
  (`gradient="identity"`, Degree-Quant's "STE"), or the identity masked to
  zero where the code was clipped (`gradient="clipped"`, as PyTorch's
  fake_quantize does), or masked to zero from the boundary codes on
  (`gradient="clipped_inner"`: Degree-Quant's "GC", whose mask is
  `code >= qmax` or `code <= qmin`). The grid gets no gradient.

  Args:
    x: the tensor, any shape.
    qparams: the grid; its fields broadcast against `x`.
    rounding: "half_even" (torch.round) or "half_away" (A2Q).
    gradient: "identity", "clipped" or "clipped_inner".

  Returns:
    The dequantized values, shaped like `x`.

  Examples:
    >>> grid = affine_qparams(0.0, 1.5, 2)   # levels 0, .5, 1, 1.5
    >>> fake_quant(jnp.array([0.2, 0.3, 2.0]), grid)
    Array([0. , 0.5, 1.5], dtype=float32)
  """
  check_choice("rounding", rounding, ROUNDING_MODES)
  check_choice("gradient", gradient, GRADIENT_MODES)
  qparams = QParams(*(jnp.asarray(f, jnp.float32) for f in qparams))
  return _fake_quant(x, qparams, rounding, gradient)


def quantize_to_codes(
  x: jax.Array, qparams: QParams, *, rounding: RoundingMode = "half_even"
) -> jax.Array:
  """The integer codes of `x` (float32 holding integers), no gradient rule."""
  codes = _codes(x, qparams.scale, qparams.zero_point, rounding)
  return jnp.clip(codes, qparams.qmin, qparams.qmax)


# ---------------------------------------------------------------------------
# Calibration: observed ranges as explicit state.
# ---------------------------------------------------------------------------


class RangeState(NamedTuple):
  """Tracked range of one quantization point (a buffer, not a parameter)."""

  lo: jax.Array
  hi: jax.Array
  initialized: jax.Array  # bool: the first observation sets the range.


def init_range_state(shape: tuple[int, ...] = ()) -> RangeState:
  """An empty range: the first observed batch will set it."""
  zeros = jnp.zeros(shape, jnp.float32)
  return RangeState(zeros, zeros, jnp.zeros((), bool))


def observe_minmax(x: jax.Array, mask: jax.Array | None = None):
  """Per-tensor min and max of `x` over the elements where `mask` is True.

  Args:
    x: any shape.
    mask: boolean, broadcastable to `x`; masked-out elements are ignored
      (filled with +-inf, so the reduction stays static-shaped under jit).

  Returns:
    `(lo, hi)` scalars; `(0, 0)` when nothing is unmasked.
  """
  if mask is None:
    return jnp.min(x), jnp.max(x)
  mask = jnp.asarray(mask)
  mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
  # Along the axes the mask is broadcast over (a row mask's features), the
  # min and max are taken first: min and max are exact in any order, and a
  # `where` over the whole of `x` was materialised by XLA:CPU before each
  # reduction (a quarter of a GIN training step's time: 206 -> 155 ms).
  spread = tuple(
    axis
    for axis, (m, n) in enumerate(zip(mask.shape, x.shape, strict=True))
    if m == 1 and n != 1
  )
  x_lo = jnp.min(x, axis=spread, keepdims=True)
  x_hi = jnp.max(x, axis=spread, keepdims=True)
  mask = jnp.broadcast_to(mask, x_lo.shape)
  lo = jnp.min(jnp.where(mask, x_lo, jnp.inf))
  hi = jnp.max(jnp.where(mask, x_hi, -jnp.inf))
  anything = jnp.any(mask)
  return jnp.where(anything, lo, 0.0), jnp.where(anything, hi, 0.0)


@functools.cache
def _sample_positions(size: int, sample_size: int) -> np.ndarray:
  """A fixed random subset of ``range(size)``, sorted (made once per shape)."""
  rng = np.random.default_rng(size)
  return np.sort(rng.choice(size, sample_size, replace=False)).astype(np.int32)


def _kth_smallest(values: jax.Array, keep, k_lo, k_hi, tail: int):
  """The k_lo-th and k_hi-th smallest kept values (1-indexed ranks).

  Both ranks lie within `tail` of their end (k_lo <= tail, n - k_hi < tail
  for n kept values), so two `top_k` of size `tail` replace a full sort
  (about 15x faster on CPU for Degree-Quant's 1% tails).
  """
  if 4 * tail >= values.shape[0]:
    ordered = jnp.sort(jnp.where(keep, values, jnp.inf))
    return ordered[k_lo - 1], ordered[k_hi - 1]
  n = jnp.sum(keep, dtype=jnp.int32)
  smallest = -jax.lax.top_k(jnp.where(keep, -values, -jnp.inf), tail)[0]
  largest = jax.lax.top_k(jnp.where(keep, values, -jnp.inf), tail)[0]
  # The k-th smallest of n is the (n - k + 1)-th largest.
  return smallest[k_lo - 1], largest[jnp.clip(n - k_hi, 0, tail - 1)]


# Counts up to this many get Python's float64 kthvalue index exactly; above
# it the table of corrections would grow too large to embed in the program,
# and the index is float32's floor(n * p), which can be one lower or higher
# where n * p lies within float32 rounding of an integer.
EXACT_INDEX_LIMIT = 1 << 22


@functools.lru_cache(maxsize=64)
def _float64_index_fixes(size: int, factor: float):
  """The counts n <= size where float32 floor(n * factor) misses Python's
  int(n * factor) (float64 arithmetic, as Degree-Quant computes its
  kthvalue indices), sorted, and Python's values there (host side)."""
  n = np.arange(size + 1, dtype=np.int64)
  want = np.floor(n * factor)
  got = np.floor(n.astype(np.float32) * np.float32(factor))
  wrong = want != got
  return n[wrong].astype(np.int32), want[wrong].astype(np.int32)


def _python_floor_product(count: jax.Array, factor: float, size: int):
  """int(count * factor) as Python computes it, for a traced int32 count of
  at most `size` (exact up to `EXACT_INDEX_LIMIT`)."""
  k = jnp.floor(count.astype(jnp.float32) * factor).astype(jnp.int32)
  if size > EXACT_INDEX_LIMIT:
    return k
  counts, values = _float64_index_fixes(size, float(factor))
  if counts.size == 0:
    return k
  at = jnp.minimum(jnp.searchsorted(counts, count), counts.size - 1)
  counts, values = jnp.asarray(counts), jnp.asarray(values)
  return jnp.where(counts[at] == count, values[at], k)


def observe_percentile(
  x: jax.Array,
  fraction: float,
  mask: jax.Array | None = None,
  *,
  sample_size: int | None = None,
):
  """Lower and upper percentile with `torch.kthvalue`'s index rule.

  Degree-Quant takes the k-th smallest value with k = max(1, int(n * p)) for
  the low end and k = int(n * (1 - p)) for the high end (1-indexed), over the
  unmasked elements only (n of them, a traced count: masked elements are
  pushed out of reach, so shapes stay static). k is Python's float64 product
  exactly (a host-side table corrects float32's floor where the two differ)
  for tensors of up to `EXACT_INDEX_LIMIT` elements.

  Args:
    x: any shape.
    fraction: p, the tail fraction (0.01 for INT4 in Degree-Quant).
    mask: boolean, broadcastable to `x`.
    sample_size: observe only this many elements (a fixed random subset)
      when `x` is larger, as Degree-Quant's ``--sample_prop``; None: all.

  Returns:
    `(lo, hi)` scalars; `(0, 0)` when nothing is unmasked.
  """
  if not 0.0 <= fraction < 0.5:
    raise ValueError(f"percentile fraction={fraction} must be in [0, 0.5)")
  flat = x.reshape(-1)
  if sample_size is not None and flat.shape[0] > sample_size:
    positions = _sample_positions(flat.shape[0], sample_size)
    flat = flat[positions]
    keep = jnp.ones(flat.shape, bool)
    if mask is not None:
      # Index the (broadcastable) mask at the sampled elements only, rather
      # than materialising it at the full size of x.
      index = np.unravel_index(positions, x.shape)
      mask = jnp.asarray(mask).reshape(
        (1,) * (x.ndim - jnp.ndim(mask)) + jnp.shape(mask)
      )
      keep = mask[
        tuple(
          i if size > 1 else 0
          for i, size in zip(index, mask.shape, strict=True)
        )
      ]
  else:
    keep = jnp.ones(flat.shape, bool)
    if mask is not None:
      keep = jnp.broadcast_to(mask, x.shape).reshape(-1)
  count = jnp.sum(keep, dtype=jnp.int32)
  size = flat.shape[0]
  k_lo = jnp.maximum(1, _python_floor_product(count, fraction, size))
  k_hi = jnp.maximum(1, _python_floor_product(count, 1.0 - fraction, size))
  tail = min(size, int(np.ceil(size * fraction)) + 2)
  lo, hi = _kth_smallest(flat, keep, k_lo, k_hi, tail)
  empty = count == 0
  return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


def update_ema(state: RangeState, lo, hi, momentum: float) -> RangeState:
  """EMA of the range (the first batch sets it): r <- r + m * (cur - r)."""
  new_lo = jnp.where(
    state.initialized, state.lo + momentum * (lo - state.lo), lo
  )
  new_hi = jnp.where(
    state.initialized, state.hi + momentum * (hi - state.hi), hi
  )
  return RangeState(new_lo, new_hi, jnp.ones((), bool))


def update_running(state: RangeState, lo, hi) -> RangeState:
  """Running min/max: the range only ever widens (MinMaxObserver)."""
  new_lo = jnp.where(state.initialized, jnp.minimum(state.lo, lo), lo)
  new_hi = jnp.where(state.initialized, jnp.maximum(state.hi, hi), hi)
  return RangeState(new_lo, new_hi, jnp.ones((), bool))


class CalibrationConfig(NamedTuple):
  """How a quantization point tracks its range (Python config, static)."""

  mode: CalibrationMode = "ema"
  momentum: float = 0.01
  percentile: float = 0.01
  sample_size: int | None = None  # Percentiles of a subset (None: exact).


def calibrate(
  state: RangeState,
  x: jax.Array,
  config: CalibrationConfig,
  mask: jax.Array | None = None,
) -> RangeState:
  """Folds one batch into the range state, outside the gradient.

  Modes (Degree-Quant's `update_ranges`): "ema" is min/max smoothed with
  `momentum`; "running" is a widening min/max; "percentile" is a running
  min/max of the per-batch percentiles (its GC-PER runs, momentum off).

  Args:
    state: the current range.
    x: the batch, any shape.
    config: the calibration mode and its constants.
    mask: elements to observe (Degree-Quant observes unprotected ones only).

  Returns:
    The new range state.
  """
  check_choice("calibration", config.mode, CALIBRATION_MODES)
  x = jax.lax.stop_gradient(x)
  if config.mode == "percentile":
    lo, hi = observe_percentile(
      x, config.percentile, mask, sample_size=config.sample_size
    )
    return update_running(state, lo, hi)
  lo, hi = observe_minmax(x, mask)
  if config.mode == "ema":
    return update_ema(state, lo, hi, config.momentum)
  return update_running(state, lo, hi)
