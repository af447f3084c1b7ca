"""The fused LoRAP prompt through jax-triton (CUDA GPUs, compute >= 8.0).

`jax_triton` (and `triton`) are imported lazily, inside functions, so that
this module imports on any machine; without them, or without a GPU, the
dispatcher sees a NotImplementedError and falls back.

`triton_call` refuses `vmap`, so the launch is wrapped in
`jax.custom_batching.custom_vmap` (tokamax's `_vmappable`): vmap axes are
folded into a leading batch dimension that the kernel's second grid axis
walks. `fold_vmap_into_batch` is that wrapper, written for any function whose
arguments and result all carry a leading batch dimension; it is tested on CPU
with a jnp stand-in for the launch.

NOT YET RUN ON A GPU: on the one GPU lent so far (an H200 whose image had
Triton 3.6), jax-triton 0.4.1 could not lower it, and `runtime_problem`
now declines such a Triton before dispatch; see kernels/README.md.
"""

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lorap_jax._src import quantization as q
from lorap_jax.kernels.lorap_prompt import config as config_lib

MIN_COMPUTE_CAPABILITY = 8.0
# jax-triton 0.4.1 (the `gpu` extra) needs Triton >= 3.7: with Triton 3.6
# (what PyTorch 2.11's CUDA 13 images carry) its lowering fails inside
# `triton.compiler.make_backend`, after dispatch, where no fallback can run.
MIN_TRITON_VERSION = (3, 7)


def compute_capability() -> float | None:
  """The default device's CUDA compute capability, or None off CUDA."""
  if jax.default_backend() != "gpu":
    return None
  value = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
  """(3, 6, 0) from "3.6.0" or "3.6.0+git1234"; non-numeric parts end it."""
  parts = []
  for part in version.split("+")[0].split("."):
    if not part.isdigit():
      break
    parts.append(int(part))
  return tuple(parts)


def runtime_problem() -> str | None:
  """Why this path cannot run on this machine, or None when it can.

  Checked at dispatch (trace) time: a GPU compiler error at lowering time
  comes after dispatch and would not fall back.
  """
  capability = compute_capability()
  if capability is None:
    backend = jax.default_backend()
    return f"triton: needs a CUDA GPU, the default backend is {backend!r}"
  if capability < MIN_COMPUTE_CAPABILITY:
    return f"triton: compute capability {capability} < {MIN_COMPUTE_CAPABILITY}"
  try:
    import jax_triton  # noqa: F401
    import triton
  except ImportError as error:
    return (
      f"triton: jax-triton is not importable ({error}); install the `gpu` extra"
    )
  installed = getattr(triton, "__version__", "0")
  if _version_tuple(installed) < MIN_TRITON_VERSION:
    wanted = ".".join(map(str, MIN_TRITON_VERSION))
    return (
      f"triton: Triton {installed} is installed, jax-triton needs >= {wanted} "
      "(its lowering fails on older releases); install the `gpu` extra"
    )
  return None


def check_supported(s_hat, w_phi) -> None:
  """Raises NotImplementedError unless this path can run here.

  Raises:
    NotImplementedError: off a CUDA GPU of compute capability >= 8.0, when
      jax-triton cannot be imported or Triton is older than it needs, or
      for dtypes the kernel does not take.
  """
  problem = runtime_problem()
  if problem is not None:
    raise NotImplementedError(problem)
  if s_hat.dtype != jnp.float32 and not jnp.issubdtype(
    s_hat.dtype, jnp.integer
  ):
    raise NotImplementedError(
      f"triton: s_hat.dtype={s_hat.dtype} (float32 or integer codes only)"
    )
  if w_phi.dtype != jnp.float32:
    raise NotImplementedError(
      f"triton: parameters in {w_phi.dtype} (float32 only)"
    )


def fold_vmap_into_batch(batched_fn: Callable[..., jax.Array]):
  """Makes `batched_fn` vmappable by folding vmap axes into its batch axis.

  Args:
    batched_fn: takes arrays that all have the same leading batch size and
      returns one array with that leading batch size (one launch for all).

  Returns:
    A `custom_vmap` function with the same contract. Under `vmap` of size V
    over inputs of batch size B, unbatched arguments are broadcast (they are
    the small parameters, or S shared by a parameter sweep), every argument
    is reshaped to a batch of V * B, and the result is reshaped back. The rule
    calls the wrapped function itself, so nested vmaps fold in one by one.
  """
  fn = jax.custom_batching.custom_vmap(batched_fn)

  @fn.def_vmap
  def _rule(axis_size, in_batched, *args):
    folded = []
    for arg, batched in zip(args, in_batched, strict=True):
      if not batched:
        arg = jnp.broadcast_to(arg, (axis_size, *arg.shape))
      folded.append(arg.reshape(axis_size * arg.shape[1], *arg.shape[2:]))
    out = fn(*folded)
    return out.reshape(axis_size, -1, *out.shape[1:]), True

  return fn


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _call_triton(*args, out_shape, **kwargs):
  """`jt.triton_call` of the kernel (the one place that imports triton).

  jax-triton 0.4 takes `out_shape=`; later versions renamed it `out_type=`
  and warn on the old name.
  """
  import jax_triton as jt

  from lorap_jax.kernels.lorap_prompt import triton_kernel

  parameters = inspect.signature(jt.triton_call).parameters
  key = "out_type" if "out_type" in parameters else "out_shape"
  return jt.triton_call(
    *args,
    kernel=triton_kernel.lorap_prompt_kernel,
    **{key: out_shape},
    **kwargs,
  )


@functools.cache
def _make_launch(
  *,
  n: int,
  d: int,
  k: int,
  r: int,
  int_input: bool,
  output: str | None,
  codes_dtype: str,
  rounding: str,
  block_config: config_lib.BlockConfig,
):
  """One vmappable launch per static configuration (cached)."""

  def launch(s, w, b, pa, pb, in_scale, in_zero, scale, zero, qmin, qmax):
    batch = s.shape[0]
    block_n = block_config.block_n
    out_dtype = jnp.dtype(codes_dtype) if output == "codes" else jnp.float32
    return _call_triton(
      s,
      w,
      b,
      pa,
      pb,
      in_scale,
      in_zero,
      scale,
      zero,
      qmin,
      qmax,
      out_shape=jax.ShapeDtypeStruct((batch, n, d), out_dtype),
      grid=(_cdiv(n, block_n), batch),
      num_warps=block_config.num_warps,
      num_stages=block_config.num_stages,
      n_rows=n,
      d=d,
      k=k,
      r=r,
      block_n=block_n,
      d_pad=config_lib.padded(d),
      k_pad=config_lib.padded(k),
      r_pad=config_lib.padded(r),
      int_input=int_input,
      quantize=output is not None,
      codes_out=output == "codes",
      half_even=rounding == "half_even",
    )

  return fold_vmap_into_batch(launch)


def lorap_prompt_triton(
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

  Returns:
    [n_nodes, d]: float32, or `codes_dtype` codes.
  """
  n, d = s_hat.shape
  k, r = p_a.shape
  # Unused pointers get a 1-element dummy: the kernel never reads them.
  dummy = jnp.zeros((1, 1), jnp.float32)
  if input_vectors is None:
    in_scale = in_zero = dummy
  else:
    in_scale, in_zero = (v.astype(jnp.float32)[None] for v in input_vectors)
  if output is None:
    scale = zero = qmin = qmax = dummy
  else:
    scale, zero, qmin, qmax = (
      v.astype(jnp.float32)[None] for v in grid_vectors
    )
  launch = _make_launch(
    n=n,
    d=d,
    k=k,
    r=r,
    int_input=input_vectors is not None,
    output=output,
    codes_dtype=codes_dtype,
    rounding=rounding,
    block_config=block_config,
  )
  out = launch(
    s_hat[None],
    w_phi[None],
    b_phi[None],
    p_a[None],
    p_b[None],
    in_scale,
    in_zero,
    scale,
    zero,
    qmin,
    qmax,
  )
  return out[0]
