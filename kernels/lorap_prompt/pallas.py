"""The fused LoRAP prompt as a Pallas kernel (GPU, or any backend interpreted).

One program per block of `block_n` rows: load the S tile once (real values,
or int8 codes dequantized in registers), compute logits, softmax, the rank-r
prompt and the re-quantization, and store the S_star tile once. The small
parameters are whole-array blocks that every program reads.

Only portable primitives are used (BlockSpecs, whole-ref loads and stores,
`jnp.dot`, `exp`, `floor`, `max`, `sum`), so the interpret twin really runs
on CPU (conventions.md, "Testing kernels without a GPU"). Two consequences:

- `jnp.round` has no Pallas Triton lowering, so half-to-even rounding is
  written with `floor` (`round_half_even`, bit-identical to `jnp.round`).
- tl.dot needs every dimension >= 16, so k and r are zero-padded to
  `padded(k)`, `padded(r)` outside the kernel (a few hundred bytes), the
  padded bias entries are -inf (their softmax weight is exactly 0), and on a
  GPU `d` must be a power of two >= 16 (the Triton lowering's block-shape
  rule; padding S itself would cost a full copy, so such widths fall back to
  another implementation instead).

Rows past `n` in the last block are masked: the Triton lowering neither
bounds-checks nor masks block loads and stores, so a plain `o_ref[...] = x`
in a partial last block writes past the output array, into whatever the
allocator placed after it (seen on an H200: the next call read corrupted
inputs). The S tile is loaded with the same row mask (`other=0`). Every
operation is row-wise, so the masked rows never mix into valid ones.

Dots run at `Precision.HIGHEST`: Pallas' Triton lowering maps the default
precision of a float32 dot to TF32, like XLA's GPU default.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lorap_jax._src import quantization as q
from lorap_jax.kernels.lorap_prompt import config as config_lib

# The dots' precision, read at trace time: IEEE float32 (module docstring);
# a benchmark may swap it to compare TF32 variants.
DOT_PRECISION = jax.lax.Precision.HIGHEST


def round_half_even(x: jax.Array) -> jax.Array:
  """Round half to even with floor only; bit-identical to `jnp.round`.

  `floor(x + 0.5)` is wrong for the float just below 0.5 (the sum rounds up
  to 1.0), so the fraction is taken exactly as `x - floor(x)` instead.

  Examples:
    >>> round_half_even(jnp.array([0.5, 1.5, -0.5, -2.5, 0.49999997]))
    Array([ 0.,  2.,  0., -2.,  0.], dtype=float32)
  """
  whole = jnp.floor(x)
  fraction = x - whole  # Exact: x and floor(x) share the exponent's grid.
  odd = (whole - 2.0 * jnp.floor(whole * 0.5)) == 1.0
  up = (fraction > 0.5) | ((fraction == 0.5) & odd)
  return whole + up.astype(x.dtype)


def round_half_away(x: jax.Array) -> jax.Array:
  """A2Q's rule, sign(x) * floor(|x| + 0.5), exactly as the reference."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def requantize(
  s_star: jax.Array,
  scale: jax.Array,
  zero_point: jax.Array,
  qmin: jax.Array,
  qmax: jax.Array,
  *,
  output: str,
  rounding: q.RoundingMode,
) -> jax.Array:
  """The output quantizer inside a kernel, the reference's ops in its order.

  Args:
    s_star: [block_n, d] float32.
    scale, zero_point, qmin, qmax: [1, d] float32.
    output: "fake" (dequantized) or "codes" (float32 holding the codes).
    rounding: "half_even" or "half_away".

  Returns:
    [block_n, d] float32.
  """
  x = s_star / scale + zero_point
  codes = round_half_even(x) if rounding == "half_even" else round_half_away(x)
  codes = jnp.minimum(jnp.maximum(codes, qmin), qmax)
  if output == "codes":
    return codes
  return (codes - zero_point) * scale


def lorap_prompt_kernel(
  s_ref,
  w_ref,
  b_ref,
  pa_ref,
  pb_ref,
  *refs,
  n_rows: int,
  int_input: bool,
  output: str | None,
  rounding: q.RoundingMode,
):
  """One [block_n, d] tile of S_star.

  Args:
    s_ref: [block_n, d] real values or integer codes.
    w_ref: [d, k_pad]; b_ref: [1, k_pad] (-inf padded); pa_ref:
      [k_pad, r_pad]; pb_ref: [r_pad, d].
    *refs: [1, d] input scale and zero point (if `int_input`), then [1, d]
      output scale, zero point, qmin and qmax (if `output`), then the
      [block_n, d] output ref.
    n_rows: rows of S; the last block's rows past it are masked.
    int_input: `s_ref` holds codes.
    output: None (no output quantizer), "fake" or "codes".
    rounding: the output quantizer's rounding.
  """
  *vector_refs, o_ref = refs
  block_n, d = s_ref.shape
  rows = pl.program_id(0) * block_n
  rows += jax.lax.broadcasted_iota(jnp.int32, (block_n, d), 0)
  in_bounds = rows < n_rows
  s = plgpu.load(s_ref, mask=in_bounds, other=0)
  if int_input:
    in_scale_ref, in_zero_ref, *vector_refs = vector_refs
    s = (s.astype(jnp.float32) - in_zero_ref[...]) * in_scale_ref[...]
  dot = functools.partial(jnp.dot, precision=DOT_PRECISION)
  logits = dot(s, w_ref[...]) + b_ref[...]
  # softmax as jax.nn.softmax computes it: exp(x - max) / sum.
  unnormalized = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  alpha = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
  s_star = s + dot(dot(alpha, pa_ref[...]), pb_ref[...])
  if output is not None:
    scale_ref, zero_ref, qmin_ref, qmax_ref = vector_refs
    s_star = requantize(
      s_star,
      scale_ref[...],
      zero_ref[...],
      qmin_ref[...],
      qmax_ref[...],
      output=output,
      rounding=rounding,
    )
  plgpu.store(o_ref, s_star.astype(o_ref.dtype), mask=in_bounds)


def pad_parameters(w_phi, b_phi, p_a, p_b):
  """Zero-pads k and r to `padded(k)`, `padded(r)` (the bias with -inf).

  Args:
    w_phi: [d, k]; b_phi: [k]; p_a: [k, r]; p_b: [r, d].

  Returns:
    `(w [d, k_pad], b [1, k_pad], p_a [k_pad, r_pad], p_b [r_pad, d])`: the
    padded logits are -inf, so their softmax weight is exactly zero, and the
    padded rank adds exact zeros.
  """
  k, r = p_a.shape
  dk = config_lib.padded(k) - k
  dr = config_lib.padded(r) - r
  w = jnp.pad(w_phi, ((0, 0), (0, dk)))
  b = jnp.pad(b_phi, (0, dk), constant_values=-jnp.inf)[None]
  pa = jnp.pad(p_a, ((0, dk), (0, dr)))
  pb = jnp.pad(p_b, ((0, dr), (0, 0)))
  return w, b, pa, pb


def check_supported(s_hat, w_phi, *, interpret: bool) -> None:
  """Raises NotImplementedError for inputs this kernel does not handle.

  Raises:
    NotImplementedError: for non-float32 parameters or real inputs, and on a
      GPU for widths that are not powers of two >= 16.
  """
  if s_hat.dtype != jnp.float32 and not jnp.issubdtype(
    s_hat.dtype, jnp.integer
  ):
    raise NotImplementedError(
      f"pallas: s_hat.dtype={s_hat.dtype} (float32 or integer codes only)"
    )
  if w_phi.dtype != jnp.float32:
    raise NotImplementedError(
      f"pallas: parameters in {w_phi.dtype} (float32 only)"
    )
  d = s_hat.shape[-1]
  if not interpret and (d < 16 or d != config_lib.next_power_of_2(d)):
    raise NotImplementedError(
      f"pallas on GPU: d={d} must be a power of two >= 16 (Triton block "
      "shapes); use triton or xla"
    )


@functools.partial(
  jax.jit,
  static_argnames=(
    "output",
    "codes_dtype",
    "rounding",
    "block_config",
    "interpret",
  ),
)
def lorap_prompt_pallas(
  s_hat: jax.Array,
  w_phi: jax.Array,
  b_phi: jax.Array,
  p_a: jax.Array,
  p_b: jax.Array,
  input_vectors: tuple[jax.Array, jax.Array] | None = None,
  grid_vectors: q.QParams | None = None,
  *,
  output: str | None = None,
  codes_dtype: str = "int8",
  rounding: q.RoundingMode = "half_even",
  block_config: config_lib.BlockConfig,
  interpret: bool = False,
) -> jax.Array:
  """The fused forward pass (no gradient rule: see `api.lorap_prompt`).

  Args:
    s_hat: [n_nodes, d] float32, or integer codes with `input_vectors`.
    w_phi: [d, k]; b_phi: [k]; p_a: [k, r]; p_b: [r, d].
    input_vectors: `(scale [d], zero_point [d])` of integer-code input.
    grid_vectors: the output grid as `QParams` of [d] float32 vectors.
    output: None (no output quantizer), "fake" or "codes".
    codes_dtype: dtype name of the codes for `output="codes"`.
    rounding: the output quantizer's rounding.
    block_config: launch parameters.
    interpret: run the kernel as XLA ops on the default device.

  Returns:
    [n_nodes, d]: float32, or `codes_dtype` codes.
  """
  n, d = s_hat.shape
  block_n = block_config.block_n
  w, b, pa, pb = pad_parameters(w_phi, b_phi, p_a, p_b)
  operands = [s_hat, w, b, pa, pb]
  row_spec = pl.BlockSpec((block_n, d), lambda i: (i, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  in_specs = [row_spec] + [whole(x.shape) for x in (w, b, pa, pb)]
  vectors = []
  if input_vectors is not None:
    vectors += list(input_vectors)
  if output is not None:
    vectors += list(grid_vectors)
  for vector in vectors:
    operands.append(vector.astype(jnp.float32).reshape(1, d))
    in_specs.append(whole((1, d)))
  out_dtype = jnp.dtype(codes_dtype) if output == "codes" else jnp.float32
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(
      num_warps=block_config.num_warps, num_stages=block_config.num_stages
    )
  kernel = functools.partial(
    lorap_prompt_kernel,
    n_rows=n,
    int_input=input_vectors is not None,
    output=output,
    rounding=rounding,
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((n, d), out_dtype),
    grid=(pl.cdiv(n, block_n),),
    in_specs=in_specs,
    out_specs=row_spec,
    interpret=interpret,
    compiler_params=compiler_params,
    name="lorap_prompt",
  )(*operands)
