"""A2Q: aggregation-aware quantization with learned steps and bit widths.

Zhu et al., ICLR 2023 (`frameworks.md`, section 3). A symmetric signed
quantizer whose step s and real bit width b are parameters:

    b_hat = round(|b|),  q_max = 2^(b_hat - 1) - 1
    x_q   = sign(x) * floor(|clip(x / |s|, -q_max, q_max)| + 0.5) * |s|

with hand-written gradients (inside means |x| <= q_max * s):

    d x_q / d s = round(x / s) - x / s  inside,  sign(x) q_max         outside
    d x_q / d b = 0                     inside,  sign(x) (q_max+1) ln2 s outside

Granularity: weights and XW get one (s, b) per output channel; node features
one per node (transductive node tasks) or, for graph tasks, one of a pool
of M pairs chosen per node by the nearest-neighbour rule. For node-task
features and for XW quantizers (node and graph tasks, as both reference
scripts) the "local gradient" replaces the task gradient of s and b by
that of the L1 quantization error, sign(x_q - x), averaged over the
other axis: most nodes of a semi-supervised task get no task gradient.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorap_jax._src.revisits import shared_param, sow_once

# The collection where every A2Q feature point sows its memory (KB).
FEATURE_MEMORY = "a2q_feature_memory"
# Points whose tensors are per-node features; the others are per channel.
FEATURE_POINTS = ("input", "aggregate", "output")
CHANNEL_POINTS = ("weight", "xw")


def check_points(points: tuple[str, ...]) -> None:
  """Refuses points A2Q does not quantize (messages: one row per edge)."""
  other = [
    name for name in points if name not in CHANNEL_POINTS + FEATURE_POINTS
  ]
  if other:
    raise ValueError(
      f"A2Q quantizes the points {CHANNEL_POINTS + FEATURE_POINTS}, not "
      f"{other}; drop them from its points (a2q.points in a run's config)"
    )


# Graph tasks: where the reference's graph-level GIN script
# (`lr_gin_reddit_binary.py`) differs from the node-level scripts, whose
# settings are the dataclass defaults: its step inits (`qGIN`'s para_list,
# |N(0.01, 0.1)| for weights and features), the wider start of post-ReLU
# inputs, and the first Linear's input left in FP32.
GRAPH_TASK_SETTINGS = {
  "weight_step_init": (0.01, 0.1),
  "feature_step_init": (0.01, 0.1),
  "extra_bit_after_relu": True,
  "quantize_first_gin_input": False,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class A2QConfig:
  """Static A2Q settings (reference defaults for Cora GCN, section 3.6).

  Attributes:
    pool_size: M, the (s, b) pairs shared by nodes in graph tasks.
    weight_step_init: mean and std of |N(.)| for weight steps.
    feature_step_init: mean and std of |N(.)| for feature steps.
    xw_step_init: mean and std of |N(.)| for XW steps.
    transductive: a node task on one graph: one (s, b) per node. Otherwise
      (graph tasks) nodes share a pool of `pool_size` pairs.
    quantize_first_input: quantize the first layer's input (off in the
      reference: Planetoid bag-of-words features are 0/1).
    local_gradient: node-task features and XW learn from their own L1
      quantization error instead of the task loss.
    memory_weight: lambda of the memory penalty (``--a_loss``).
    memory_target_kb: the feature memory the penalty allows (``--a_storage``);
      None: `target_average_bits` bits per stored feature element (per
      node of a node task; per pool entry in use in a graph task).
    target_average_bits: the allowed memory as an average bit width, which
      does not depend on the graph's size or the hidden width.
    gin_input_per_channel: every GIN layer but the first quantizes its input
      per channel before message passing (both reference GIN scripts'
      `q_xw` on x transposed, `quant_fea=True` on every layer but the
      first): an "xw" quantizer, so its steps start at `xw_step_init` and
      learn at the XW rate from the local gradient, and its bits stay
      frozen.
    extra_bit_after_relu: a Linear whose input follows a ReLU starts that
      input one bit wider (the reference's `all_positive` QLinear): the
      signed grid then has as many levels above zero as an unsigned grid
      of `bits`. The memory penalty counts the extra bit.
    quantize_first_gin_weight: the first GIN layer's first Linear quantizes
      its weight (both reference GIN scripts).
    quantize_first_gin_input: that Linear also quantizes its input, the
      first aggregate, per node (the node-level `qGINConv.py`; the
      graph-level script keeps it in FP32).
  """

  transductive: bool = True
  quantize_first_input: bool = False
  pool_size: int = 1000
  weight_step_init: tuple[float, float] = (0.1, 0.2)
  feature_step_init: tuple[float, float] = (0.01, 0.01)
  xw_step_init: tuple[float, float] = (0.01, 0.01)
  local_gradient: bool = True
  memory_weight: float = 2.5
  memory_target_kb: float | None = None
  target_average_bits: float = 4.0
  gin_input_per_channel: bool = True
  extra_bit_after_relu: bool = False
  quantize_first_gin_weight: bool = True
  quantize_first_gin_input: bool = True

  def __post_init__(self):
    if self.pool_size < 1:
      raise ValueError(f"A2Q pool_size={self.pool_size} must be at least 1")
    target = self.memory_target_kb
    if self.memory_weight < 0 or (target is not None and target < 0):
      raise ValueError("A2Q memory_weight and memory_target_kb must be >= 0")
    if self.target_average_bits <= 0:
      raise ValueError(
        f"A2Q target_average_bits={self.target_average_bits} must be > 0"
      )


def clip_level(bits: jax.Array) -> jax.Array:
  """q_max = 2^(round(b) - 1) - 1 for positive real bit widths b."""
  return 2.0 ** (jnp.round(bits) - 1.0) - 1.0


def _reduce_to(grad: jax.Array, shape: tuple[int, ...], mean: bool):
  """Sums (or averages) `grad` over the axes where `shape` broadcasts."""
  axes = tuple(
    i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1
  )
  reduced = (
    jnp.mean(grad, axes, keepdims=True)
    if mean
    else grad.sum(axes, keepdims=True)
  )
  return reduced.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def quantize(x, step, bits, local_gradient: bool, clipped: bool):
  """A2Q fake quantization with its custom gradients.

  Args:
    x: [rows, cols] tensor.
    step: positive steps broadcastable to `x` ([rows, 1] or [1, cols]).
    bits: positive real bit widths, the shape of `step`.
    local_gradient: train `step` and `bits` on sign(x_q - x), averaged over
      the broadcast axis, instead of the upstream gradient (summed).
    clipped: zero the gradient of `x` where |x / s| > q_max (the clipped
      STE). Note: the reference clamps x / s in place before saving it, so
      its clipping test never fires and its STE is the identity in effect.

  Returns:
    x_q, the shape of `x`.
  """
  return _quantize_fwd(x, step, bits, local_gradient, clipped)[0]


def _quantize_fwd(x, step, bits, local_gradient, clipped):
  del local_gradient, clipped
  q_max = clip_level(bits)
  scaled = jnp.clip(x / step, -q_max, q_max)
  # Half away from zero, with the sign of x itself: at round(b) = 0 the
  # clip level is -1/2, every |x / s| becomes 1/2 and the quantizer is the
  # binary sign(x) * s, as in the reference.
  codes = jnp.sign(x) * jnp.floor(jnp.abs(scaled) + 0.5)
  return codes * step, (x, step, bits, scaled, codes)


def _quantize_bwd(local_gradient, clipped, residuals, g):
  x, step, bits, scaled, codes = residuals
  q_max = clip_level(bits)
  inside = jnp.abs(x) <= q_max * step
  grad_x = jnp.where(inside, g, 0.0) if clipped else g
  d_step = jnp.where(inside, codes - scaled, jnp.sign(x) * q_max)
  d_bits = jnp.where(
    inside, 0.0, jnp.sign(x) * (q_max + 1.0) * math.log(2.0) * step
  )
  upstream = jnp.sign(codes * step - x) if local_gradient else g
  grad_step = _reduce_to(upstream * d_step, step.shape, local_gradient)
  grad_bits = _reduce_to(upstream * d_bits, bits.shape, local_gradient)
  return grad_x, grad_step, grad_bits


quantize.defvjp(_quantize_fwd, _quantize_bwd)


def nearest_pool_entries(
  x: jax.Array, pool_step: jax.Array, pool_bits: jax.Array
) -> jax.Array:
  """Section 3.4: the pool entry of each node, argmin_k (f_i - m_k)^2.

  f_i = max_j |x_ij| and m_k = 2^(round|b_k| - 1) * s_k: the reference has
  no "- 1" in m_k (the paper's Algorithm 1 writes q_max * s); kept as coded.

  The distances are one-dimensional, so the nearest m_k is one of the two
  around f_i in sorted order: a binary search per node (O(n log M)) instead
  of the reference's [n, M] distance table, which took four fifths of an A2Q
  GIN training step on PROTEINS (M = 1000). Ties go to the lower index, as
  argmin's do: among equal m_k, and between the two neighbours.

  Args:
    x: [n_nodes, d] features.
    pool_step: [M] steps.
    pool_bits: [M] bit widths.

  Returns:
    int32 [n_nodes] pool indices.
  """
  feature_max = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1))
  entry_max = jax.lax.stop_gradient(
    2.0 ** (jnp.round(jnp.abs(pool_bits)) - 1.0) * jnp.abs(pool_step)
  )
  order = jnp.argsort(entry_max, stable=True)
  sorted_max = entry_max[order]
  # The first m >= f (the first of its equal run), and the first of the run
  # of the largest m < f; both clamped into the pool at its ends.
  above = jnp.searchsorted(sorted_max, feature_max, side="left")
  upper = jnp.minimum(above, entry_max.shape[0] - 1)
  lower = jnp.searchsorted(
    sorted_max, sorted_max[jnp.maximum(above - 1, 0)], side="left"
  )
  lower_distance = (feature_max - sorted_max[lower]) ** 2
  upper_distance = (feature_max - sorted_max[upper]) ** 2
  lower_entry, upper_entry = order[lower], order[upper]
  take_lower = (lower_distance < upper_distance) | (
    (lower_distance == upper_distance) & (lower_entry < upper_entry)
  )
  return jnp.where(take_lower, lower_entry, upper_entry).astype(jnp.int32)


def _abs_normal_init(mean: float, std: float):
  def init(key, shape):
    return jnp.abs(mean + std * jax.random.normal(key, shape, jnp.float32))

  return init


def _constant_init(value):
  def init(key, shape):
    del key
    return jnp.full(shape, value, jnp.float32)

  return init


def quantize_point(
  module: nn.Module,
  name: str,
  x: jax.Array,
  *,
  bits,
  config: A2QConfig,
  clipped: bool,
  observe: jax.Array | None = None,
) -> jax.Array:
  """The A2Q quantizer of the point `name` inside `module`.

  Parameters (in "params", named ``a2q_<point>_step`` / ``_bits``) are
  created on first use; `bits` is only their initial bit width. Feature
  points sow [memory KB, KB per bit, stored bits, stored elements] into
  `FEATURE_MEMORY`: the last two, the rounded widths (at least 1) the
  real nodes' features take and their count, give the average stored
  width. The memory, for the penalty, is width *
  sum of |b| / 8192 KB, over the real nodes (`observe`) of a node task, or
  over the pool entries the real nodes of a batch use (with the KB per
  bit of those same rows or entries, for the average-width target). The
  reference multiplies by the hidden width at every layer; this uses each
  tensor's own width.

  Raises:
    ValueError: for a point A2Q does not quantize (messages).
  """
  if name in CHANNEL_POINTS:
    flat = x.reshape(-1, x.shape[-1])
    init = config.weight_step_init if name == "weight" else config.xw_step_init
    step = shared_param(
      module, f"a2q_{name}_step", _abs_normal_init(*init), (1, flat.shape[1])
    )
    bit_param = shared_param(
      module, f"a2q_{name}_bits", _constant_init(bits), (1, flat.shape[1])
    )
    local = config.local_gradient and name == "xw"
    y = quantize(flat, jnp.abs(step), jnp.abs(bit_param), local, clipped)
    return y.reshape(x.shape)
  check_points((name,))
  if x.ndim != 2:
    raise ValueError(
      f"A2Q quantizes node features [n_nodes, d] per node; the point {name!r} "
      f"got shape {x.shape} (sparse inputs: set sparse_input=False)"
    )
  flat = x
  step_init = _abs_normal_init(*config.feature_step_init)
  observed = jnp.ones(x.shape[0]) if observe is None else observe
  if config.transductive:
    # Transductive: one (s, b) per node of the one graph.
    step = jnp.abs(
      shared_param(module, f"a2q_{name}_step", step_init, (x.shape[0], 1))
    )
    node_bits = jnp.abs(
      shared_param(
        module, f"a2q_{name}_bits", _constant_init(bits), (x.shape[0], 1)
      )
    )
    local = config.local_gradient
    memory_bits = jnp.sum(node_bits[:, 0] * observed)
    stored_rows = jnp.sum(observed)
  else:
    pool_step = shared_param(
      module, f"a2q_{name}_step", step_init, (config.pool_size,)
    )
    pool_bits = shared_param(
      module, f"a2q_{name}_bits", _constant_init(bits), (config.pool_size,)
    )
    entry = nearest_pool_entries(flat, pool_step, pool_bits)
    step = jnp.abs(pool_step)[entry][:, None]
    node_bits = jnp.abs(pool_bits)[entry][:, None]
    local = False
    # The reference counts each pool entry a batch uses once.
    used = jnp.zeros(config.pool_size).at[entry].max(observed)
    memory_bits = jnp.sum(used * jnp.abs(pool_bits))
    stored_rows = jnp.sum(used)
  y = quantize(flat, step, node_bits, local, clipped)
  width = flat.shape[1]
  # The KB per bit counts what the memory counts: nodes, or pool entries
  # (so a pool's target is an average over the entries in use).
  kb_per_bit = width * stored_rows / 8192.0
  # What the real nodes' features take, entry by entry, for reporting.
  node_widths = jnp.maximum(jnp.round(node_bits[:, 0]), 1.0)
  stored_bits = width * jnp.sum(node_widths * observed)
  memory = jnp.stack(
    [
      width * memory_bits / 8192.0,
      kb_per_bit,
      stored_bits,
      width * jnp.sum(observed),
    ]
  )
  sow_once(module, FEATURE_MEMORY, name, memory)
  return y


def memory_penalty(memory: jax.Array, config: A2QConfig) -> jax.Array:
  """lambda * ReLU(M_feat - M_target)^2, section 3.5.

  Args:
    memory: the sum of what the feature points sowed, starting (M_feat in
      KB, KB per bit of average width).
    config: the penalty's weight and target.
  """
  target = config.memory_target_kb
  if target is None:
    target = config.target_average_bits * memory[1]
  excess = jax.nn.relu(memory[0] - target)
  return config.memory_weight * excess**2


def average_feature_bits(params) -> float:
  """Mean storage width, max(round(|b|), 1), of every feature (s, b) pair.

  round(|b|) = 0 still stores one bit (the sign quantizer above).
  """
  values = [
    jnp.maximum(jnp.round(jnp.abs(leaf)), 1.0).reshape(-1)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if _leaf_name(path).endswith("_bits")
    and _leaf_name(path).split("_")[1] in FEATURE_POINTS
  ]
  if not values:
    return float("nan")
  return float(jnp.mean(jnp.concatenate(values)))


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))
