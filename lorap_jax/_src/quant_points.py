"""Named quantization points inside Flax layers: the thin quantizer.

A layer calls `quantize_point(module, "message", x, ...)`. The point's range
lives in the `quant_stats` variable collection (like BatchNorm's
`batch_stats`): it is updated only when training, and frozen in evaluation.
Which points are active, and how they calibrate, is static Python config
(`QuantConfig`); the bit width is an array argument, so it can be swept.
"""

import dataclasses

import flax.linen as nn
import jax

from lorap_jax._src import a2q as a2q_lib
from lorap_jax._src import quantization as q
from lorap_jax._src.a2q import A2QConfig
from lorap_jax._src.degree_quant import DegreeProtection
from lorap_jax._src.mixq import MixQConfig

QUANT_STATS = "quant_stats"

# The named points of a message-passing layer, in data-flow order.
POINT_NAMES = ("input", "weight", "xw", "message", "aggregate", "output")

# Plain QAT's reference runs (Degree-Quant "STE-MOM"): EMA min/max, m = 0.01.
DEFAULT_CALIBRATION = q.CalibrationConfig(mode="ema", momentum=0.01)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """Static description of a model's fake quantization.

  Attributes:
    enabled: False gives the FP32 model (every point is the identity).
    points: the active quantization points (a subset of `POINT_NAMES`).
    calibration: how ranges are tracked.
    rounding: "half_even" or "half_away".
    gradient: the STE rule, "identity", "clipped" or "clipped_inner".
    weight_calibration: weights are quantized with their current min/max
      (Degree-Quant tracks them like activations; using the exact range of the
      current weights avoids a lag, and is the "running" choice for a tensor
      that is seen whole every step).
    protection: Degree-Quant's protective masking in training (None: off).
    a2q: A2Q's learned-step, learned-bit quantizer replaces the affine one
      at every active point (None: affine).
    mixq: MixQ's mixture over candidate widths replaces it (None: affine).
  """

  enabled: bool = True
  points: tuple[str, ...] = POINT_NAMES
  calibration: q.CalibrationConfig = DEFAULT_CALIBRATION
  rounding: q.RoundingMode = "half_even"
  gradient: q.GradientMode = "identity"
  weight_calibration: str = "current"
  protection: DegreeProtection | None = None
  a2q: A2QConfig | None = None
  mixq: MixQConfig | None = None

  def __post_init__(self):
    unknown = sorted(set(self.points) - set(POINT_NAMES))
    if unknown:
      raise ValueError(
        f"unknown quantization points {unknown}; known: {POINT_NAMES}"
      )
    if self.a2q is not None:
      a2q_lib.check_points(self.points)
    if self.calibration.mode not in q.CALIBRATION_MODES:
      raise ValueError(
        f"calibration={self.calibration.mode!r} is not one of "
        f"{q.CALIBRATION_MODES}"
      )
    if self.rounding not in q.ROUNDING_MODES:
      raise ValueError(
        f"rounding={self.rounding!r} is not one of {q.ROUNDING_MODES}"
      )
    if self.gradient not in q.GRADIENT_MODES:
      raise ValueError(
        f"gradient={self.gradient!r} is not one of {q.GRADIENT_MODES}"
      )

  def active(self, point: str) -> bool:
    return self.enabled and point in self.points


FP32 = QuantConfig(enabled=False)


def point_grid(
  module: nn.Module,
  name: str,
  x: jax.Array,
  *,
  bits: jax.Array,
  config: QuantConfig,
  train: bool,
  mask: jax.Array | None = None,
) -> q.QParams | None:
  """Calibrates the point `name` on `x` and returns its grid.

  In training the batch is folded into the stored range first (Degree-Quant
  updates, then quantizes). In evaluation the stored range is used as it is;
  a point that has never been calibrated falls back to the batch's own range
  rather than to an arbitrary one. Weights (the point "weight") use the range
  of their current values, which needs no state.

  Args:
    module: the Flax module that owns the point (its variable scope).
    name: one of `POINT_NAMES`, unique within `module`.
    x: the tensor about to be quantized.
    bits: bit width (array).
    config: the model's quantization config.
    train: whether ranges may be updated.
    mask: elements that count for the range (None: all).

  Returns:
    The point's `QParams`, or None where the point is inactive.
  """
  if not config.active(name):
    return None
  if name == "weight" and config.weight_calibration == "current":
    lo, hi = q.observe_minmax(jax.lax.stop_gradient(x))
    return q.affine_qparams(lo, hi, bits, signed=True)
  # get/put rather than `module.variable`: a point may be visited twice in
  # one call (LoRAP re-quantizes on the aggregate's quantizer), and each
  # visit folds its tensor into the same range, as a PyTorch module would.
  stored = module.get_variable(QUANT_STATS, name) or q.init_range_state()
  if module.is_initializing():
    module.put_variable(QUANT_STATS, name, stored)
  if train and not module.is_initializing():
    current = q.calibrate(stored, x, config.calibration, mask)
    module.put_variable(QUANT_STATS, name, current)
  else:
    current = _stored_or_first_range(stored, x, config, mask)
  return q.affine_qparams(current.lo, current.hi, bits, signed=True)


def _stored_or_first_range(stored, x, config, mask):
  """The stored range, or `x`'s for a point that was never calibrated."""

  def first_range():
    return q.calibrate(q.init_range_state(), x, config.calibration, mask)

  if not isinstance(stored.initialized, jax.core.Tracer):
    # Outside jit: decided here. An eager `lax.cond` compiles its branches
    # again at every call (each call's are new functions to its cache).
    return stored if bool(stored.initialized) else first_range()
  # A cond, not a select: the batch's range (a pass over x) is computed
  # only for a point that was never calibrated.
  return jax.lax.cond(stored.initialized, lambda: stored, first_range)


def apply_grid(
  x: jax.Array, grid: q.QParams | None, config: QuantConfig
) -> jax.Array:
  """Fake-quantizes `x` on `grid` with the config's STE (None: identity)."""
  if grid is None:
    return x
  return q.fake_quant(
    x, grid, rounding=config.rounding, gradient=config.gradient
  )


def quantize_point(module: nn.Module, name: str, x: jax.Array, **kwargs):
  """Fake-quantizes `x` at the point `name`; see `point_grid` for kwargs."""
  return apply_grid(x, point_grid(module, name, x, **kwargs), kwargs["config"])
