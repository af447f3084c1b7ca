"""The public fused-prompt op and its implementation dispatch.

Three implementations of one op (see `reference.py` for its definition):

| name     | what runs                              | where                    |
|----------|----------------------------------------|--------------------------|
| "xla"    | `lorap_prompt_reference` (pure jnp)    | everywhere; test oracle  |
| "pallas" | `pallas.lorap_prompt_pallas`           | GPU, or `interpret=True` |
| "triton" | `triton.lorap_prompt_triton`           | CUDA, compute >= 8.0     |

`implementation` is a name, a sequence of names tried in order, or
None / "auto": ("triton", "pallas", "xla") on a CUDA GPU of compute
capability >= 8.0, ("pallas", "xla") on other GPUs, ("xla",) elsewhere,
unless tuned_configs.json holds a measured order for the GPU's device kind
(on an H200, XLA's unfused prompt measured fastest: kernels/README.md). A
backend that cannot run the call raises NotImplementedError at trace time and
the next one is tried; if none can, the errors are raised together as an
ExceptionGroup. (Errors the GPU compiler raises later, at lowering time, are
outside the dispatcher's reach.)

The fused paths are wrapped in one `jax.custom_vjp` whose backward pass is
`jax.vjp` of the reference (the `backward_pass_impl='xla'` idea of Pallas'
layer_norm): the gradients, the straight-through estimator of the output
quantizer included, are the reference's by construction. A fused backward
kernel would not pay here: the parameter gradients are reductions over all
nodes (S^T @ dlogits and friends), which XLA's GEMMs already do at memory
speed, and the recomputed forward is one more pass over S.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax._src import quantization as q
from lorap_jax.kernels.lorap_prompt import config as config_lib
from lorap_jax.kernels.lorap_prompt import pallas as pallas_lib
from lorap_jax.kernels.lorap_prompt import triton as triton_lib
from lorap_jax.kernels.lorap_prompt.reference import (
  OUTPUT_MODES,
  OutputMode,
  lorap_prompt_reference,
)

IMPLEMENTATIONS = ("xla", "pallas", "triton")
AUTO = "auto"


def auto_implementations() -> tuple[str, ...]:
  """The order "auto" tries on this machine's default backend.

  Returns:
    On a GPU whose device kind has a measured `"auto_order"` in
    tuned_configs.json, that order; else ("triton", "pallas", "xla") on a
    CUDA GPU of compute capability >= 8.0, ("pallas", "xla") on other GPUs,
    and ("xla",) elsewhere.

  Raises:
    ValueError: if the measured order names an unknown implementation.
  """
  if jax.default_backend() != "gpu":
    return ("xla",)
  measured = config_lib.measured_auto_order(jax.devices()[0].device_kind)
  if measured is not None:
    unknown = [name for name in measured if name not in IMPLEMENTATIONS]
    if unknown or not measured:
      raise ValueError(
        f"{config_lib.TUNED_CONFIGS_PATH.name}: auto_order={list(measured)} "
        f"must name implementations from {IMPLEMENTATIONS}"
      )
    return measured
  capability = triton_lib.compute_capability()
  if capability is not None and capability >= triton_lib.MIN_COMPUTE_CAPABILITY:
    return ("triton", "pallas", "xla")
  return ("pallas", "xla")


def resolve_implementations(
  implementation: str | Sequence[str] | None,
) -> tuple[str, ...]:
  """The implementation names to try, in order.

  Args:
    implementation: a name, a sequence of names, or None / "auto".

  Returns:
    A non-empty tuple of names from `IMPLEMENTATIONS`.

  Raises:
    ValueError: on an unknown name or an empty sequence.
  """
  if implementation is None or implementation == AUTO:
    return auto_implementations()
  names = (
    (implementation,)
    if isinstance(implementation, str)
    else tuple(implementation)
  )
  if not names:
    raise ValueError("implementation=() names no implementation")
  unknown = [n for n in names if n not in IMPLEMENTATIONS]
  if unknown:
    raise ValueError(
      f"implementation={unknown} unknown; available: {IMPLEMENTATIONS} "
      f"or {AUTO!r}"
    )
  return names


class _Operands(NamedTuple):
  """The differentiable operands of the fused op (a pytree)."""

  s_hat: jax.Array
  w_phi: jax.Array
  b_phi: jax.Array
  p_a: jax.Array
  p_b: jax.Array
  input_scale: jax.Array | None  # [1, d], integer-code input only.
  input_zero_point: jax.Array | None  # [1, d], integer-code input only.
  grid: q.QParams | None  # Fields [1, d].


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static configuration of one fused call (the custom_vjp nondiff arg)."""

  implementation: str
  output: str | None  # None: no output quantizer.
  codes_dtype: str
  rounding: str
  gradient: str
  block_config: config_lib.BlockConfig
  interpret: bool


def _reference(options: _Options, ops: _Operands) -> jax.Array:
  return lorap_prompt_reference(
    ops.s_hat,
    ops.w_phi,
    ops.b_phi,
    ops.p_a,
    ops.p_b,
    ops.grid,
    input_scale=ops.input_scale,
    input_zero_point=ops.input_zero_point,
    output=options.output or "fake",
    codes_dtype=options.codes_dtype,
    rounding=options.rounding,
    gradient=options.gradient,
  )


def _launch(options: _Options, ops: _Operands) -> jax.Array:
  input_vectors = (
    None
    if ops.input_scale is None
    else (ops.input_scale[0], ops.input_zero_point[0])
  )
  grid_vectors = (
    None if ops.grid is None else q.QParams(*(f[0] for f in ops.grid))
  )
  common = dict(
    output=options.output,
    codes_dtype=options.codes_dtype,
    rounding=options.rounding,
    block_config=options.block_config,
  )
  args = (ops.s_hat, ops.w_phi, ops.b_phi, ops.p_a, ops.p_b)
  if options.implementation == "pallas":
    return pallas_lib.lorap_prompt_pallas(
      *args, input_vectors, grid_vectors, interpret=options.interpret, **common
    )
  return triton_lib.lorap_prompt_triton(
    *args, input_vectors, grid_vectors, **common
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(options: _Options, ops: _Operands) -> jax.Array:
  return _launch(options, ops)


def _fused_fwd(options: _Options, ops: _Operands):
  # The inputs are the residuals: the backward pass recomputes the reference
  # forward (one more read of S) instead of storing alpha and the logits.
  return _launch(options, ops), ops


def _fused_bwd(options: _Options, ops: _Operands, g):
  _, vjp_fn = jax.vjp(functools.partial(_reference, options), ops)
  return vjp_fn(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def lorap_prompt(
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
  implementation: str | Sequence[str] | None = None,
  block_config: config_lib.BlockConfig | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """The LoRAP prompt, S_star = Q(S_hat + softmax(S_hat W + b) P_A P_B).

  Differentiable (custom VJP equal to the reference's), jittable and
  vmappable with every implementation.

  Args:
    s_hat: the aggregate, [n_nodes, d]: real values (training), or integer
      codes (inference) with `input_scale` and `input_zero_point`.
    w_phi: [d, k]; b_phi: [k]; p_a: [k, r]; p_b: [r, d].
    grid: output quantizer grid (fields scalars or [d]), or None for FP32.
    input_scale: scale of integer-code `s_hat` (a scalar or [d]).
    input_zero_point: zero point of integer-code `s_hat` (default 0).
    output: with a grid, "fake" (real values on the grid, straight-through
      gradient) or "codes" (integer codes as `codes_dtype`).
    codes_dtype: integer dtype of the codes; it must hold [qmin, qmax].
    rounding: rounding mode of the output quantizer.
    gradient: STE rule of the output quantizer ("identity" or "clipped").
    implementation: "xla", "pallas", "triton", a sequence of them to try in
      order, or None / "auto" for the best available (module docstring).
    block_config: launch parameters of the fused kernels; None:
      `config.get_default` for this shape and device.
    interpret: run the Pallas kernel in interpret mode (as XLA ops on the
      default device). None: compiled on a GPU; elsewhere the Pallas path
      declines unless interpret=True. Ignored by the other implementations.

  Returns:
    [n_nodes, d]: float32 (s_hat's float dtype on the xla path), or integer
    codes for `output="codes"`.

  Raises:
    ValueError: on an unknown implementation or option, mismatched shapes, or
      inconsistent quantization arguments.
    ExceptionGroup: of the NotImplementedErrors of every tried implementation
      when none can run the call.

  Examples:
    >>> s = jnp.ones((5, 8))
    >>> w, b = jnp.zeros((8, 4)), jnp.zeros(4)
    >>> p_a, p_b = jnp.ones((4, 2)), jnp.ones((2, 8))
    >>> lorap_prompt(s, w, b, p_a, p_b, implementation="xla")[0, :3]
    Array([3., 3., 3.], dtype=float32)
  """
  names = resolve_implementations(implementation)
  _check_shapes(s_hat, w_phi, b_phi, p_a, p_b)
  for name, value, allowed in (
    ("output", output, OUTPUT_MODES),
    ("rounding", rounding, q.ROUNDING_MODES),
    ("gradient", gradient, q.GRADIENT_MODES),
  ):
    if value not in allowed:
      raise ValueError(f"{name}={value!r} is not one of {allowed}")
  n, d = s_hat.shape
  k, r = p_a.shape
  int_input = jnp.issubdtype(s_hat.dtype, jnp.integer)
  if int_input and input_scale is None:
    raise ValueError(
      f"s_hat.dtype={s_hat.dtype} holds integer codes: input_scale (and "
      "input_zero_point) must be given"
    )
  if not int_input and (
    input_scale is not None or input_zero_point is not None
  ):
    raise ValueError(
      f"input_scale is only for integer-code s_hat, got {s_hat.dtype=}"
    )
  if output == "codes":
    if grid is None:
      raise ValueError('output="codes" needs a grid to quantize on')
    _check_codes_dtype(codes_dtype, grid)
  ops = _Operands(
    s_hat,
    w_phi,
    b_phi,
    p_a,
    p_b,
    _channel_row(input_scale, d, "input_scale") if int_input else None,
    _channel_row(
      0.0 if input_zero_point is None else input_zero_point,
      d,
      "input_zero_point",
    )
    if int_input
    else None,
    None
    if grid is None
    else q.QParams(
      *(
        _channel_row(field, d, f"grid.{field_name}")
        for field, field_name in zip(grid, q.QParams._fields, strict=True)
      )
    ),
  )
  quantized_output = None if grid is None else output
  codes_dtype = np.dtype(codes_dtype).name
  errors = []
  for name in names:
    try:
      if name == "xla":
        options = _Options(
          "xla", quantized_output, codes_dtype, rounding, gradient, None, False
        )
        return _reference(options, ops)
      if name == "pallas":
        run_interpreted = bool(interpret)
        if interpret is None and jax.default_backend() != "gpu":
          raise NotImplementedError(
            f"pallas: needs a GPU (default backend "
            f"{jax.default_backend()!r}); pass interpret=True to run it in "
            "interpret mode"
          )
        if not run_interpreted and jax.default_backend() != "gpu":
          raise NotImplementedError(
            "pallas: interpret=False needs a GPU backend"
          )
        pallas_lib.check_supported(s_hat, w_phi, interpret=run_interpreted)
      else:
        run_interpreted = False
        triton_lib.check_supported(s_hat, w_phi)
      config = block_config or config_lib.get_default(
        n, d, k, r, jax.devices()[0].device_kind, implementation=name
      )
      options = _Options(
        name,
        quantized_output,
        codes_dtype,
        rounding,
        gradient,
        config,
        run_interpreted,
      )
      return _fused(options, ops)
    except NotImplementedError as error:
      errors.append(error)
  raise ExceptionGroup(
    f"lorap_prompt: no implementation among {names} can run this call",
    errors,
  )


def _channel_row(value, d: int, name: str) -> jax.Array:
  """A scalar or per-channel quantity as a float32 [1, d] row.

  [1, d] broadcasts against [n, d] without rank promotion (which the test
  suite forbids) and is the kernels' block shape.
  """
  value = jnp.asarray(value, jnp.float32)
  if value.size not in (1, d) or value.ndim > 2:
    raise ValueError(
      f"{name} has shape {value.shape}: it must be a scalar or hold {d} "
      "per-channel values"
    )
  return jnp.broadcast_to(value.reshape(1, -1), (1, d))


def _check_codes_dtype(codes_dtype, grid: q.QParams) -> None:
  dtype = np.dtype(codes_dtype)
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f"codes_dtype={dtype} must be an integer dtype")
  info = np.iinfo(dtype)
  # Traced grids (a vmapped bit-width sweep) cannot be checked without a sync.
  for bound, reduce, outside in (
    (grid.qmin, np.min, lambda v: v < info.min),
    (grid.qmax, np.max, lambda v: v > info.max),
  ):
    if not isinstance(bound, jax.core.Tracer) and outside(
      float(reduce(np.asarray(bound)))
    ):
      raise ValueError(f"codes_dtype={dtype} cannot hold the grid [qmin, qmax]")


def _check_shapes(s_hat, w_phi, b_phi, p_a, p_b) -> None:
  if s_hat.ndim != 2:
    raise ValueError(f"s_hat.shape={s_hat.shape} must be [n_nodes, d]")
  if p_a.ndim != 2:
    raise ValueError(f"p_a.shape={p_a.shape} must be [k, r]")
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
