"""Pure-jnp LoRAP prompt: the test oracle and the 'xla' implementation."""

import jax
import jax.numpy as jnp

from lorap_jax._src import quantization as q


def lorap_prompt_reference(
  s_hat: jax.Array,
  w_phi: jax.Array,
  b_phi: jax.Array,
  p_a: jax.Array,
  p_b: jax.Array,
  grid: q.QParams | None = None,
  *,
  rounding: q.RoundingMode = "half_even",
  gradient: q.GradientMode = "identity",
) -> jax.Array:
  """S_star = Q(S_hat + softmax(S_hat @ W_phi + b_phi) @ P_A @ P_B).

  Args:
    s_hat: dequantized aggregate, [n_nodes, d].
    w_phi: weight generator kernel, [d, k].
    b_phi: weight generator bias, [k].
    p_a: first factor of the prompt basis, [k, r].
    p_b: second factor of the prompt basis, [r, d].
    grid: the aggregate quantizer's grid used to re-quantize, or None (FP32).
    rounding: rounding mode of the re-quantizer.
    gradient: STE rule of the re-quantizer.

  Returns:
    The prompted aggregate, [n_nodes, d].
  """
  alpha = jax.nn.softmax(s_hat @ w_phi + b_phi[None], axis=-1)
  # (alpha @ P_A) @ P_B costs n*(k*r + r*d), never materialising [k, d].
  prompt = (alpha @ p_a) @ p_b
  s_star = s_hat + prompt.astype(s_hat.dtype)
  if grid is None:
    return s_star
  return q.fake_quant(s_star, grid, rounding=rounding, gradient=gradient)


def prompt_only_reference(s_hat, w_phi, b_phi, p_a, p_b) -> jax.Array:
  """The additive prompt P alone, [n_nodes, d] (for analysis and tests)."""
  alpha = jax.nn.softmax(s_hat @ w_phi + b_phi[None], axis=-1)
  return jnp.dot(jnp.dot(alpha, p_a), p_b)
