"""MixQ-GNN: a differentiable search over bit widths per component.

Moustafa, Kriege and Gansterer, ICDE 2025 (`frameworks.md`, section 4).
Every quantized tensor (a "component": a point of a layer, e.g.
``conv_0/linear/weight``) has one affine quantizer per candidate width b_k,
each with a scale and zero point calibrated once from the first batch and
then *learned*, and logits alpha; in the search the forward pass uses the
mixture

    t~ = sum_k softmax(alpha)_k FQ_{b_k}(t),

and the loss adds lambda * sum over components of the expected memory
(sum_k softmax(alpha)_k b_k) * numel(t) / 8192 KB. Afterwards each component
keeps its argmax width and the fixed-width model is trained again (with one
candidate, the same quantizer is MixQ's fixed-bit QAT).

Three things the reference does that this does not (section 4.1 / 4.2):
its GCN/GIN wrappers divide the children's penalty by 8192 a second time;
when it builds the fixed GCN from the winners it reads the weight and XW
widths in swapped order; and its K weight copies share one storage (it
assigns ``weight.data`` of copy 0 to the others), so they are one weight
that takes K Adam steps, one per copy's moments, every iteration. Here the
penalty is divided once, every component keeps its own winner, and the
copies are separate parameters trained apart (the search's weights learn
more slowly than the reference's). The reference's unused edge-weight
quantizer ("e", which only enters its penalty) is not modelled.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax._src import quantization
from lorap_jax._src.revisits import shared_param, sow_once

# Collections the points sow into: expected memory (KB) for the penalty,
# and operation counts for the bit-operation estimate.
EXPECTED_MEMORY = "mixq_expected_memory"
OPERATIONS = "mixq_operations"
GRANULARITIES = ("tensor", "column")
# The fixed stage keeps each component's width in the quantizers' state
# (`quant_points.QUANT_STATS`; that module imports this one).
_STATE = "quant_stats"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixQConfig:
  """Static MixQ settings.

  Attributes:
    candidates: the candidate bit widths B.
    memory_weight: lambda of the expected-memory penalty (negative values
      favour wider candidates, as in the reference's lambda = -1e-8). The
      reference's lambda divided by 8192 gives the same trade-off here.
    granularity: one (scale, zero point) per "tensor" or per "column"
      (feature channel; weights: per input feature, as the reference's
      ``max(dim=0)`` on PyTorch's [out, in] layout).
    selected: the fixed stage: (component, width) pairs chosen by the
      search; None during the search.
  """

  candidates: tuple[int, ...] = (2, 4, 8)
  memory_weight: float = 0.1 / 8192
  granularity: str = "column"
  selected: tuple[tuple[str, int], ...] | None = None

  def __post_init__(self):
    if not self.candidates or any(
      not isinstance(b, int) or not 1 <= b <= 16 for b in self.candidates
    ):
      raise ValueError(
        f"MixQ candidates={self.candidates} must be integers in 1..16"
      )
    if self.granularity not in GRANULARITIES:
      raise ValueError(
        f"MixQ granularity={self.granularity!r} is not one of {GRANULARITIES}"
      )

  def widths(self, component: str) -> tuple[int, ...]:
    """The candidate widths of `component`: all, or its selected one."""
    if self.selected is None:
      return self.candidates
    chosen = dict(self.selected)
    if component not in chosen:
      raise ValueError(
        f"no selected width for the MixQ component {component!r}; the "
        f"selection names {sorted(chosen)}"
      )
    return (chosen[component],)


def integer_range(bits):
  """Signed [-2^(b-1), 2^(b-1) - 1]; the reference's b = 1 is [-1, 1].

  `bits` is an int (floats returned) or an integer array (float32 arrays).
  """
  if isinstance(bits, int | np.integer):
    if bits == 1:
      return -1.0, 1.0
    return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
  bits = jnp.asarray(bits, jnp.int32)
  half = jnp.left_shift(1, bits - 1).astype(jnp.float32)  # Exact, unlike exp2.
  one_bit = bits == 1
  return jnp.where(one_bit, -1.0, -half), jnp.where(one_bit, 1.0, half - 1.0)


def _reduction_axes(x: jax.Array, granularity: str, weight: bool):
  if granularity == "tensor" or x.ndim < 2:
    return tuple(range(x.ndim))
  # Our kernels are [in, out]: per input feature reduces over the rest.
  if weight:
    return tuple(range(1, x.ndim))
  return tuple(range(x.ndim - 1))


def calibrate(x: jax.Array, bits: int, axes) -> tuple[jax.Array, jax.Array]:
  """The one-time calibration: scale and zero point from min / max.

  s = (max - min) / (qmax - qmin) + 1e-16, z = round(qmax - max / s), the
  range first widened to contain zero; z is not clamped (as coded).
  """
  qmin, qmax = integer_range(bits)
  lo = jnp.minimum(jnp.min(x, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 0.0)
  scale = (hi - lo) / (qmax - qmin) + 1e-16
  return scale, jnp.round(qmax - hi / scale)


def _sum_to(grad: jax.Array, shape) -> jax.Array:
  """Sums a gradient down to a parameter's (broadcastable) shape."""
  shape = (1,) * (grad.ndim - len(shape)) + tuple(shape)
  axes = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
  return jnp.sum(grad, axes, keepdims=True).reshape(shape)


def fake_quantize(x, scale, zero_point, bits, mean_axis: int = 0):
  """MixQ's FakeQuantize: y = s (round(clip(z + x / s)) - z).

  Gradients (its custom backward): x gets the clipped STE (zero where
  z + x / s leaves [qmin, qmax]); the scale gets mean(g * x / s) and the
  zero point mean(g) over `mean_axis` (PyTorch's dim 0: nodes for
  activations, output features for [out, in] weights, i.e. axis 1 of our
  [in, out] kernels), summed down to their shapes: heuristics, not the
  exact derivatives. `bits`: an int, or an integer array (no gradient).
  """
  qmin, qmax = integer_range(bits)
  return _fake_quantize(x, scale, zero_point, qmin, qmax, mean_axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fake_quantize(x, scale, zero_point, qmin, qmax, mean_axis):
  codes = jnp.round(jnp.clip(zero_point + x / scale, qmin, qmax))
  return scale * (codes - zero_point)


def _fake_quantize_fwd(x, scale, zero_point, qmin, qmax, mean_axis):
  y = _fake_quantize(x, scale, zero_point, qmin, qmax, mean_axis)
  return y, (x, scale, zero_point, qmin, qmax)


def _fake_quantize_bwd(mean_axis, residuals, g):
  x, scale, zero_point, qmin, qmax = residuals
  shifted = zero_point + x / (scale + 1e-16)
  inside = (shifted >= qmin) & (shifted <= qmax)
  grad_scale = jnp.mean(g * (shifted - zero_point), mean_axis, keepdims=True)
  grad_zero = jnp.mean(jnp.broadcast_to(g, x.shape), mean_axis, keepdims=True)
  return (
    jnp.where(inside, g, 0.0),
    _sum_to(grad_scale, scale.shape),
    _sum_to(grad_zero, zero_point.shape),
    jnp.zeros_like(qmin),
    jnp.zeros_like(qmax),
  )


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def initial_logits(widths: tuple[int, ...]) -> jax.Array:
  """softmax(softmax(b)): the reference's start, leaning to wide widths."""
  return jax.nn.softmax(jax.nn.softmax(jnp.asarray(widths, jnp.float32)))


def component_name(module: nn.Module, point: str) -> str:
  return "/".join((*module.path, point))


def _stored_width(module: nn.Module, name: str, width: int) -> jax.Array:
  """The fixed stage's width of a point, kept in the quantizers' state.

  Read at run time, the width is an input of the compiled steps rather
  than a constant in them: every selection (each fold's, each seed's)
  lowers to the same program, which JAX's compilation cache then compiles
  once. A revisited point reads the stored value.
  """
  key = f"mixq_{name}_bits"
  if not module.has_variable(_STATE, key):
    module.put_variable(_STATE, key, jnp.int32(width))
  return module.get_variable(_STATE, key)


def quantize_point(
  module: nn.Module,
  name: str,
  x: jax.Array,
  *,
  config: MixQConfig,
  observe: jax.Array | None = None,
) -> jax.Array:
  """The relaxed (or, with one width, fixed) MixQ quantizer of a point.

  Creates, in "params": ``mixq_<point>_scale`` / ``_zero`` ([K, ...],
  calibrated from the tensor seen at initialisation), ``mixq_<point>_logits``
  ([K]), and for weights ``mixq_<point>_copies``, the K - 1 extra weight
  copies (initialised equal, trained apart; see the module notes). With a
  selection (the fixed stage), also the width, ``mixq_<point>_bits`` in
  "quant_stats". Sows the expected memory into `EXPECTED_MEMORY`.
  """
  widths = config.widths(component_name(module, name))
  if config.selected is not None:
    widths = (_stored_width(module, name, widths[0]),)
  weight = name == "weight"
  axes = _reduction_axes(x, config.granularity, weight)
  seen = x
  if observe is not None and not weight:
    # Padding rows must not set the range: a batch's filler node receives
    # every padding edge, and once its features are non-zero (a node prompt,
    # a bias) its aggregate dwarfs the real ones. Zero is always in range.
    seen = jnp.where(quantization.per_row(observe, x.ndim), x, 0.0)

  def init_qparams(index):
    def init(key):
      del key
      pairs = [calibrate(seen, b, axes) for b in widths]
      return jnp.stack([p[index] for p in pairs])

    return init

  scales = shared_param(module, f"mixq_{name}_scale", init_qparams(0))
  zeros = shared_param(module, f"mixq_{name}_zero", init_qparams(1))
  logits = shared_param(
    module, f"mixq_{name}_logits", lambda key: initial_logits(widths)
  )
  tensors = [x] * len(widths)
  if weight and len(widths) > 1:
    copies = shared_param(
      module,
      f"mixq_{name}_copies",
      lambda key: jnp.stack([x] * (len(widths) - 1)),
    )
    tensors = [x, *copies]
  probabilities = jax.nn.softmax(logits)
  mean_axis = 1 if weight and x.ndim == 2 else 0
  y = sum(
    probabilities[k] * fake_quantize(t, scales[k], zeros[k], b, mean_axis)
    for k, (t, b) in enumerate(zip(tensors, widths, strict=True))
  )
  numel = x.size if observe is None else jnp.sum(observe) * x[0].size
  expected_bits = jnp.sum(probabilities * jnp.asarray(widths, jnp.float32))
  sow_once(module, EXPECTED_MEMORY, name, expected_bits * numel / 8192.0)
  return y


def selected_widths(params, config: MixQConfig) -> dict[str, int]:
  """Each component's argmax of softmax(alpha), by component name."""
  chosen = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    leaf_name = names[-1]
    if leaf_name.startswith("mixq_") and leaf_name.endswith("_logits"):
      point = leaf_name[len("mixq_") : -len("_logits")]
      component = "/".join((*names[:-1], point))
      widths = config.widths(component)
      chosen[component] = int(widths[int(jnp.argmax(leaf))])
  return chosen


def memory_penalty(expected_kb: jax.Array, config: MixQConfig) -> jax.Array:
  return config.memory_weight * expected_kb


# The components whose widths set the precision of a module's operations.
_OPERATION_COMPONENTS = {
  "matmul": ("input", "weight", "xw"),
  "aggregate": ("aggregate",),
}


def bit_operations(operations, selected: dict[str, int]) -> float:
  """Estimated bit operations: ops x the mean selected width of the module.

  As the reference (`torch_operation_counter` count x the mean winning
  width of the module): a linear layer's multiply-adds take the mean width
  of its input, weight and output components; an aggregation's additions
  the aggregate's width. Modules without selected components count 32 bits.

  Args:
    operations: the `OPERATIONS` collection sown by one forward pass.
    selected: component name -> width.
  """
  total = 0.0
  for path, count in jax.tree_util.tree_leaves_with_path(operations):
    names = [str(getattr(k, "key", k)) for k in path]
    # Sown values are tuples: [..., module, kind, index].
    module, kind = "/".join(names[:-2]), names[-2]
    widths = [
      selected[f"{module}/{point}"]
      for point in _OPERATION_COMPONENTS[kind]
      if f"{module}/{point}" in selected
    ]
    mean_width = sum(widths) / len(widths) if widths else 32.0
    total += float(count) * mean_width
  return total
