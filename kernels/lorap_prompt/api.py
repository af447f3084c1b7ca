"""The public fused-prompt op and its implementation dispatch."""

from collections.abc import Sequence

import jax

from lorap_jax._src import quantization as q
from lorap_jax.kernels.lorap_prompt.reference import lorap_prompt_reference

IMPLEMENTATIONS = ("xla",)


def lorap_prompt(
  s_hat: jax.Array,
  w_phi: jax.Array,
  b_phi: jax.Array,
  p_a: jax.Array,
  p_b: jax.Array,
  grid: q.QParams | None = None,
  *,
  rounding: q.RoundingMode = "half_even",
  gradient: q.GradientMode = "identity",
  implementation: str | Sequence[str] | None = None,
) -> jax.Array:
  """The LoRAP prompt, S_star = Q(S_hat + softmax(S_hat W + b) P_A P_B).

  Args:
    s_hat: dequantized aggregate, [n_nodes, d].
    w_phi: [d, k]; b_phi: [k]; p_a: [k, r]; p_b: [r, d].
    grid: re-quantization grid, or None for FP32.
    rounding: rounding mode of the re-quantizer.
    gradient: STE rule of the re-quantizer.
    implementation: "xla" (pure jnp), a sequence to try in order, or None for
      the best available. Fused Pallas and Triton kernels plug in here.

  Returns:
    [n_nodes, d].

  Raises:
    ValueError: on an unknown implementation name or mismatched shapes.
  """
  names = (
    ("xla",)
    if implementation is None
    else (
      (implementation,)
      if isinstance(implementation, str)
      else tuple(implementation)
    )
  )
  unknown = [n for n in names if n not in IMPLEMENTATIONS]
  if unknown:
    raise ValueError(
      f"implementation={unknown} unknown; available: {IMPLEMENTATIONS}"
    )
  _check_shapes(s_hat, w_phi, b_phi, p_a, p_b)
  return lorap_prompt_reference(
    s_hat, w_phi, b_phi, p_a, p_b, grid, rounding=rounding, gradient=gradient
  )


def _check_shapes(s_hat, w_phi, b_phi, p_a, p_b) -> None:
  d = s_hat.shape[-1]
  k, r = p_a.shape
  expected = {
    "w_phi": (w_phi.shape, (d, k)),
    "b_phi": (b_phi.shape, (k,)),
    "p_b": (p_b.shape, (r, d)),
  }
  for name, (got, want) in expected.items():
    if tuple(got) != want:
      raise ValueError(
        f"{name}.shape={tuple(got)} must be {want} for s_hat [n, {d}] and "
        f"p_a [{k}, {r}]"
      )
