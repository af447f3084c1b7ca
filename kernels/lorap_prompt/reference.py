"""Pure-jnp LoRAP prompt: the test oracle and the 'xla' implementation.

The op, for one message-passing layer (lorap.md, sections 2 and 5):

    S_hat  = S                          real input (training), or
           = (codes - z_in) * s_in      integer codes (inference)
    alpha  = softmax(S_hat @ W_phi + b_phi)               [n_nodes, k]
    S_star = S_hat + (alpha @ P_A) @ P_B                  [n_nodes, d]
    out    = S_star                     no output quantizer (grid None)
           = fake_quant(S_star, grid)   output="fake": real values on the grid
           = quantize(S_star, grid)     output="codes": integer codes

The fused kernels reproduce exactly this sequence of operations (same
dequantization, same softmax, same `x / scale + zero_point` before rounding),
and their backward pass is `jax.vjp` of this function.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax._src import quantization as q

OutputMode = Literal["fake", "codes"]
OUTPUT_MODES = ("fake", "codes")

# Full float32 on GPUs too, where a float32 dot defaults to TF32 (a 10-bit
# mantissa, about 1e-3 relative): the fused kernels' dots are IEEE, and the
# backward pass of every implementation is this function's. The dots are
# thin (k, r <= a few dozen), so the op stays memory-bound either way.
_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def dequantize_codes(
  codes: jax.Array, scale: jax.Array, zero_point: jax.Array
) -> jax.Array:
  """Real values of integer codes, (codes - zero_point) * scale, in float32.

  Args:
    codes: integer codes, [n_nodes, d].
    scale: broadcasts against `codes` (a scalar or [d]).
    zero_point: broadcasts against `codes` (a scalar or [d]).

  Returns:
    [n_nodes, d] float32.
  """
  scale = jnp.asarray(scale, jnp.float32)
  zero_point = jnp.asarray(zero_point, jnp.float32)
  return (codes.astype(jnp.float32) - zero_point) * scale


def lorap_prompt_reference(
  s_hat: jax.Array,
  w_phi: jax.Array,
  b_phi: jax.Array,
  p_a: jax.Array,
  p_b: jax.Array,
  grid: q.QParams | None = None,
  *,
  input_scale: jax.Array | float | None = None,
  input_zero_point: jax.Array | float | None = None,
  output: OutputMode = "fake",
  codes_dtype: jnp.dtype | type = jnp.int8,
  rounding: q.RoundingMode = "half_even",
  gradient: q.GradientMode = "identity",
) -> jax.Array:
  """S_star = Q(S_hat + softmax(S_hat @ W_phi + b_phi) @ P_A @ P_B).

  Args:
    s_hat: the aggregate, [n_nodes, d]: real values, or integer codes when
      `input_scale` is given.
    w_phi: weight generator kernel, [d, k].
    b_phi: weight generator bias, [k].
    p_a: first factor of the prompt basis, [k, r].
    p_b: second factor of the prompt basis, [r, d].
    grid: the aggregate quantizer's grid used to re-quantize, or None (FP32).
    input_scale: scale of integer-code `s_hat` (a scalar or [d]); None for
      real-valued `s_hat`.
    input_zero_point: zero point of integer-code `s_hat` (default 0).
    output: "fake" (dequantized values on `grid`, with the straight-through
      gradient) or "codes" (the integer codes, as `codes_dtype`; needs `grid`).
    codes_dtype: integer dtype of the codes when `output="codes"`.
    rounding: rounding mode of the re-quantizer.
    gradient: STE rule of the re-quantizer.

  Returns:
    The prompted aggregate, [n_nodes, d]: real values (s_hat's float dtype,
    float32 for integer input) or integer codes.

  Raises:
    ValueError: on integer `s_hat` without `input_scale` (or the reverse),
      an unknown output mode, or codes requested without a grid.
  """
  if output not in OUTPUT_MODES:
    raise ValueError(f"output={output!r} is not one of {OUTPUT_MODES}")
  if jnp.issubdtype(s_hat.dtype, jnp.integer):
    if input_scale is None:
      raise ValueError(
        f"s_hat.dtype={s_hat.dtype} holds integer codes: input_scale "
        "(and input_zero_point) must be given"
      )
    zero_point = 0.0 if input_zero_point is None else input_zero_point
    s_hat = dequantize_codes(s_hat, input_scale, zero_point)
  elif input_scale is not None or input_zero_point is not None:
    raise ValueError(
      f"input_scale is only for integer-code s_hat, got {s_hat.dtype=}"
    )
  alpha = jax.nn.softmax(_dot(s_hat, w_phi) + b_phi[None], axis=-1)
  # (alpha @ P_A) @ P_B costs n*(k*r + r*d), never materialising [k, d].
  prompt = _dot(_dot(alpha, p_a), p_b)
  s_star = s_hat + prompt.astype(s_hat.dtype)
  if grid is None:
    if output == "codes":
      raise ValueError('output="codes" needs a grid to quantize on')
    return s_star
  if output == "codes":
    if not np.issubdtype(np.dtype(codes_dtype), np.integer):
      raise ValueError(f"{codes_dtype=} must be an integer dtype")
    grid = q.QParams(*(jnp.asarray(f, jnp.float32) for f in grid))
    codes = q.quantize_to_codes(s_star, grid, rounding=rounding)
    return codes.astype(codes_dtype)
  return q.fake_quant(s_star, grid, rounding=rounding, gradient=gradient)


def prompt_only_reference(s_hat, w_phi, b_phi, p_a, p_b) -> jax.Array:
  """The additive prompt P alone, [n_nodes, d] (for analysis and tests)."""
  alpha = jax.nn.softmax(_dot(s_hat, w_phi) + b_phi[None], axis=-1)
  return _dot(_dot(alpha, p_a), p_b)
