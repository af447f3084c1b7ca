"""Quantized GCN, GIN and GAT layers over `jraph.GraphsTuple`.

Every layer exposes the named quantization points of `quant_points`
(input, weight, xw, message, aggregate, output) and a hook right after the
aggregate is quantized, where a post-aggregation prompt (LoRAP) goes:

    S_hat  = Q_agg(segment_sum(messages))
    S_star = hook(S_hat, grid of Q_agg)       # identity without a prompt
    out    = Q_out(update(S_star))

Aggregation is `jax.ops.segment_sum` with `num_segments` read from static
shapes, so every layer is jit-friendly and vmappable. FP32 is the same layer
with quantization off.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from lorap_jax._src import a2q, mixq, quant_points, quantization
from lorap_jax._src.quant_points import QuantConfig, apply_grid, point_grid
from lorap_jax._src.subgraph import SubgraphInfo, subgraph_info

# The collection where each layer sows the aggregate its update sees (after
# LoRAP, where there is one): `models.GNN.apply(..., mutable=[INTERMEDIATES])`.
INTERMEDIATES = "intermediates"

# Signature: (s_hat [n_nodes, d], requantize | None) -> s_star [n_nodes, d],
# where requantize(x) fake-quantizes x on the aggregate quantizer.
PostAggregationFn = Callable[..., jax.Array]


# Rows with at most this many non-zeros get the row-slot layout below;
# beyond it the unrolled sum would outgrow the scatter it replaces.
MAX_ROW_SLOTS = 64


@flax.struct.dataclass
class SparseFeatures:
  """A sparse node-feature matrix in COO form (rows sorted).

  Bag-of-words features (Planetoid) are over 98% zeros, and zero is exactly
  representable after affine quantization (the range always contains it), so
  the first layer can quantize and multiply the non-zeros alone.

  Attributes:
    rows: [nnz] int32 row (node) indices, sorted.
    cols: [nnz] int32 feature indices.
    values: [nnz] float32 values.
    shape: static (n_nodes, n_features).
    row_slots: [n_nodes, K] int32, row i's k-th non-zero (an index into
      `values`), or nnz where row i has fewer than k + 1; K is the largest
      row count. None where K > `MAX_ROW_SLOTS`. With it, X @ W is a sum of
      K gathered rows per node, which XLA:CPU fuses into one pass, instead
      of an [nnz, d] product scattered into rows.
  """

  rows: jax.Array
  cols: jax.Array
  values: jax.Array
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)
  row_slots: jax.Array | None = None

  @classmethod
  def from_dense(cls, dense: np.ndarray) -> "SparseFeatures":
    """Builds the COO form of a dense numpy matrix (host side)."""
    rows, cols = np.nonzero(dense)
    return cls(
      rows=rows.astype(np.int32),
      cols=cols.astype(np.int32),
      values=np.asarray(dense[rows, cols], np.float32),
      shape=tuple(dense.shape),
      row_slots=_row_slots(rows, dense.shape[0]),
    )

  def replace_values(self, values: jax.Array) -> "SparseFeatures":
    return self.replace(values=values)

  def to_dense(self) -> jax.Array:
    dense = jnp.zeros(self.shape, self.values.dtype)
    return dense.at[self.rows, self.cols].add(self.values)


def _row_slots(rows: np.ndarray, n_rows: int) -> np.ndarray | None:
  """The `SparseFeatures.row_slots` of sorted COO rows (host side)."""
  counts = np.bincount(rows, minlength=n_rows)
  width = int(counts.max(initial=0))
  if width == 0 or width > MAX_ROW_SLOTS:
    return None
  starts = np.cumsum(counts) - counts
  slots = np.full((n_rows, width), rows.size, np.int32)
  slots[rows, np.arange(rows.size) - starts[rows]] = np.arange(rows.size)
  return slots


Features = jax.Array | SparseFeatures


class RowMasks(NamedTuple):
  """Per-row roles in a node or edge tensor about to be quantized.

  Attributes:
    observe: bool [rows], the rows whose values set the quantizer's range:
      real (unpadded) rows, minus Degree-Quant's protected ones. None: all.
    keep: bool [rows], rows left in full precision (Degree-Quant's
      protected nodes, or the messages they send). None: none.
  """

  observe: jax.Array | None = None
  keep: jax.Array | None = None

  def gather(self, index: jax.Array) -> "RowMasks":
    """The masks of rows `index`, e.g. of messages by their sender."""
    return RowMasks(
      *(None if m is None else m[index] for m in (self.observe, self.keep))
    )


# Every row observed, none kept: the default of every point.
ALL_ROWS = RowMasks()


def node_row_masks(
  node_mask: jax.Array | None, protected: jax.Array | None
) -> RowMasks:
  """Row masks of node tensors from the padding and protection masks."""
  if protected is None:
    return RowMasks(observe=node_mask)
  unprotected = ~protected
  if node_mask is not None:
    unprotected = unprotected & node_mask
  return RowMasks(observe=unprotected, keep=protected)


def feature_width(x: Features) -> int:
  return x.shape[-1]


def matmul(x: Features, w: jax.Array) -> jax.Array:
  """x @ w for dense or sparse x: [n, f] @ [f, d] -> [n, d]."""
  if not isinstance(x, SparseFeatures):
    return x @ w
  # The barrier makes XLA materialise the (fake-quantized) [f, d] kernel
  # once; otherwise it fuses the quantizer into the gather and recomputes
  # it for each of the nnz gathered rows (nnz*d instead of f*d elements).
  w = jax.lax.optimization_barrier(w)
  if x.row_slots is not None:
    return _row_slot_matmul(x.values, w, x.rows, x.cols, x.row_slots)
  gathered = x.values[:, None] * w[x.cols]
  return jax.ops.segment_sum(
    gathered, x.rows, num_segments=x.shape[0], indices_are_sorted=True
  )


@jax.custom_vjp
def _row_slot_matmul(values, w, rows, cols, row_slots):
  """Sparse x @ w as, per row, the sum of its K slots' `value * w[col]`.

  The forward pass is one fused loop over [n, d] (K gathers per element)
  where the COO form writes and scatters an [nnz, d] product; autodiff of
  the unrolled sum would scatter K times, so the backward pass is written
  out: the COO scatter for w, a gathered dot product for the values.
  """
  # A padded slot points one past the end: it reads value 0 and column 0.
  # The barrier materialises the (quantized) values once, before the
  # gather, rather than recomputing them in it per slot.
  values = jax.lax.optimization_barrier(values)
  slot_values = jnp.take(values, row_slots, mode="fill", fill_value=0)
  slot_cols = jnp.take(cols, row_slots, mode="fill", fill_value=0)
  out = jnp.zeros((row_slots.shape[0], w.shape[1]), w.dtype)
  for k in range(row_slots.shape[1]):
    out = out + slot_values[:, k, None] * w[slot_cols[:, k]]
  return out


def _row_slot_matmul_fwd(values, w, rows, cols, row_slots):
  # Materialised once for both passes: otherwise XLA fuses the values'
  # quantizer (and Degree-Quant's protection select) into the backward
  # pass's [nnz, d] product and recomputes it d times per non-zero. The
  # same holds for the incoming gradient (a clipped STE's mask).
  values = jax.lax.optimization_barrier(values)
  out = _row_slot_matmul(values, w, rows, cols, row_slots)
  return out, (values, w, rows, cols)


def _row_slot_matmul_bwd(residuals, g):
  values, w, rows, cols = residuals
  # Materialised before the gather, for the same reason as the values.
  g_rows = jax.lax.optimization_barrier(g)[rows]
  grad_w = jax.ops.segment_sum(
    values[:, None] * g_rows, cols, num_segments=w.shape[0]
  )
  grad_values = jnp.sum(w[cols] * g_rows, axis=-1)
  return grad_values, grad_w, None, None, None


_row_slot_matmul.defvjp(_row_slot_matmul_fwd, _row_slot_matmul_bwd)


def _multiply_adds(x: Features, width: int) -> int:
  """Multiply-adds of x @ W with W [f, width] (non-zeros only if sparse)."""
  if isinstance(x, SparseFeatures):
    return x.values.shape[0] * width
  return x.shape[0] * x.shape[1] * width


def quantize_features(
  layer: "_QuantLayer", x: Features, *, bits, train, rows: "RowMasks"
) -> Features:
  """The "input" point for dense or sparse features.

  For sparse features only the non-zeros are quantized: the zeros map to
  zero exactly, and the range (widened to contain zero) is the same as the
  dense matrix's.
  """
  if isinstance(x, SparseFeatures):
    values = layer.qpoint(
      "input", x.values, bits=bits, train=train, rows=rows.gather(x.rows)
    )
    return x.replace_values(values)
  return layer.qpoint("input", x, bits=bits, train=train, rows=rows)


def add_self_loops(
  senders: jax.Array, receivers: jax.Array, n_nodes: int
) -> tuple[jax.Array, jax.Array]:
  """Appends one self-loop per node (fill value 1, as PyG's GCNConv)."""
  # int32 whatever the input (jraph padding returns int64 numpy indices).
  senders, receivers = senders.astype(jnp.int32), receivers.astype(jnp.int32)
  loops = jnp.arange(n_nodes, dtype=jnp.int32)
  return (
    jnp.concatenate([senders, loops]),
    jnp.concatenate([receivers, loops]),
  )


def gcn_normalization(
  senders: jax.Array, receivers: jax.Array, n_nodes: int
) -> jax.Array:
  """Symmetric GCN coefficients d_s^-1/2 d_r^-1/2 per edge, [n_edges].

  Degrees are in-degrees over the given edges (self-loops included), so every
  node has degree >= 1 once loops are added and no division by zero occurs.
  """
  ones = jnp.ones(receivers.shape, jnp.float32)
  degree = jax.ops.segment_sum(ones, receivers, num_segments=n_nodes)
  inv_sqrt = jnp.where(degree > 0, jax.lax.rsqrt(jnp.maximum(degree, 1.0)), 0.0)
  return inv_sqrt[senders] * inv_sqrt[receivers]


def sampled_gcn_normalization(
  senders: jax.Array,
  receivers: jax.Array,
  info: SubgraphInfo,
  *,
  self_loops: bool = True,
) -> jax.Array:
  """GCN coefficients of a sampled subgraph from the full graph's degrees.

  An edge s -> r gets (d_s + 1)^-1/2 (d_r + 1)^-1/2 * d_r / k_r, with d the
  full graph's in-degrees (`info`) and k_r the in-edges of r in the
  subgraph: the full graph's coefficient, scaled so that the sum over the
  k_r sampled neighbours estimates the sum over all d_r without bias (the
  GraphSAGE / VR-GCN neighbour-sampling estimator). Where every in-edge of
  r was sampled (k_r = d_r) it is the full graph's coefficient exactly.
  Without self-loops the +1 terms are dropped.

  Args:
    senders: int [n_edges] sampled edges, without self-loops.
    receivers: int [n_edges].
    info: the subgraph's full-graph degrees ([n_nodes]).
    self_loops: whether the layer adds one self-loop per node.

  Returns:
    float32 [n_edges] (+ [n_nodes] self-loop coefficients, 1 / (d + 1),
    appended when `self_loops`), aligned with `add_self_loops`' edges.
  """
  n_nodes = info.in_degree.shape[0]
  sampled = jax.ops.segment_sum(
    jnp.ones(receivers.shape, jnp.float32), receivers, num_segments=n_nodes
  )
  # Padding nodes have degree 0, so their (padding) in-edges weigh 0.
  scale = jnp.where(sampled > 0, info.in_degree / jnp.maximum(sampled, 1.0), 0)
  degree = info.in_degree + (1.0 if self_loops else 0.0)
  inv_sqrt = jnp.where(degree > 0, jax.lax.rsqrt(jnp.maximum(degree, 1.0)), 0)
  norm = inv_sqrt[senders] * inv_sqrt[receivers] * scale[receivers]
  if not self_loops:
    return norm
  return jnp.concatenate([norm, inv_sqrt * inv_sqrt])


def _aggregate_and_prompt(
  layer: "_QuantLayer",
  aggregate: jax.Array,
  *,
  bits,
  train,
  rows: RowMasks,
  additions: int,
) -> jax.Array:
  """S_hat = Q_agg(aggregate), then the post-aggregation hook.

  The hook re-quantizes with the same aggregate quantizer, as calling one
  PyTorch quantizer module twice would: in training its range also observes
  the prompted aggregate, so a prompt that moves values is not silently
  clipped to the range of the unprompted ones.
  """
  s_hat = layer.qpoint(
    "aggregate", aggregate, bits=bits, train=train, rows=rows
  )
  requantize = None
  if layer.quant.active("aggregate"):
    requantize = functools.partial(
      layer.qpoint, "aggregate", bits=bits, train=train, rows=rows
    )
  return _prompt_and_record(layer, s_hat, requantize, additions=additions)


def _prompt_and_record(
  layer: "_QuantLayer",
  s_hat: jax.Array,
  requantize: Callable[[jax.Array], jax.Array] | None,
  *,
  additions: int,
) -> jax.Array:
  """The post-aggregation hook on S_hat, and what the update sees, sown."""
  if layer.quant.mixq is not None:
    # The aggregation's operation count, for MixQ's bit-operation estimate.
    layer.sow(mixq.OPERATIONS, "aggregate", additions)
  s_star = s_hat
  if layer.prompt is not None:
    s_star = layer.prompt(s_hat, requantize)
  # What the update sees, for analysis (`apply(..., mutable=INTERMEDIATES)`);
  # a no-op unless that collection is mutable.
  layer.sow(INTERMEDIATES, "aggregate", s_star)
  return s_star


class Dropout(nn.Dropout):
  """`nn.Dropout` with its keep-mask materialised once per step.

  Without the barrier XLA fuses the mask's random draw into each consumer,
  and the backward pass re-runs the Threefry hash for every element (two
  [2708, 64] hashes per Cora step). Same module name, random stream and
  result as `nn.Dropout`.
  """

  @nn.compact
  def __call__(self, inputs, deterministic=None, rng=None):
    deterministic = nn.merge_param(
      "deterministic", self.deterministic, deterministic
    )
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jax.random.bernoulli(rng, p=keep_prob, shape=shape)
    mask = jnp.broadcast_to(jax.lax.optimization_barrier(mask), inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class _QuantLayer(nn.Module):
  """Shared quantization plumbing (bits, config, train flag)."""

  quant: QuantConfig = quant_points.FP32

  def qpoint(
    self,
    name,
    x,
    *,
    bits,
    train,
    rows: RowMasks = ALL_ROWS,
    index: jax.Array | None = None,
  ):
    """Fake-quantizes `x` at the point `name`.

    Only the rows `rows.observe` set the range, and the rows `rows.keep`
    pass through unquantized (with an identity gradient).

    With `index`, the point quantizes `x[index]` (messages that copy their
    sender's row), observed with `rows.gather(index)`. The affine quantizer
    then rounds each row of `x` once and gathers the result: the same
    values and ranges, and the same gradients (its straight-through mask
    depends on the value alone) summed in another order, without a pass
    over every edge's copy.
    """
    if index is not None and (
      self.quant.mixq is not None or self.quant.a2q is not None
    ):
      x, rows, index = x[index], rows.gather(index), None
    if self.quant.mixq is not None:
      if not self.quant.active(name):
        return x
      return mixq.quantize_point(
        self, name, x, config=self.quant.mixq, observe=rows.observe
      )
    if self.quant.a2q is not None:
      if not self.quant.active(name):
        return x
      return a2q.quantize_point(
        self,
        name,
        x,
        bits=bits,
        config=self.quant.a2q,
        clipped=self.quant.gradient == "clipped",
        observe=rows.observe,
      )
    observed, observe = self._observed(x, rows, index)
    grid = point_grid(
      self,
      name,
      observed,
      bits=bits,
      config=self.quant,
      train=train,
      mask=quantization.per_row(observe, x.ndim),
    )
    if grid is None:
      return x if index is None else x[index]
    y = apply_grid(x, grid, self.quant)
    if rows.keep is not None:
      y = jnp.where(quantization.per_row(rows.keep, x.ndim), x, y)
    if index is None:
      return y
    # Quantized once per row: XLA:CPU would otherwise fuse the quantizer
    # into the gather and run it again for every copy.
    return jax.lax.optimization_barrier(y)[index]

  def _observed(self, x, rows: RowMasks, index):
    """What sets the range of a point on `x[index]` (or `x`): a tensor and
    its row mask."""
    if index is None:
      return x, rows.observe
    if self.quant.calibration.mode == "percentile":
      return x[index], rows.gather(index).observe
    # Min and max ignore how often a row is copied: the rows `index` names,
    # observed once each, give the range of their copies.
    named = jnp.zeros(x.shape[0], bool).at[index].set(True)
    return x, named if rows.observe is None else named & rows.observe


class QuantDense(_QuantLayer):
  """A linear layer with "input", "weight" and "xw" quantization points.

  Attributes:
    features: output width.
    use_bias: add a bias after the quantized product.
    nonnegative_input: the input follows a ReLU; A2Q (`extra_bit_after_relu`)
      then starts its input bits one wider.
  """

  features: int = 0
  use_bias: bool = True
  nonnegative_input: bool = False

  @nn.compact
  def __call__(
    self,
    x: Features,
    *,
    bits=None,
    train: bool = False,
    rows: RowMasks = ALL_ROWS,
  ):
    """[n, f] -> [n, features]; `rows` applies to the input and product."""
    x = quantize_features(
      self, x, bits=self._input_bits(bits), train=train, rows=rows
    )
    kernel = self.param(
      "kernel",
      nn.initializers.glorot_uniform(),
      (feature_width(x), self.features),
    )
    kernel = self.qpoint("weight", kernel, bits=bits, train=train)
    if self.quant.mixq is not None:
      self.sow(mixq.OPERATIONS, "matmul", _multiply_adds(x, self.features))
    y = self.qpoint("xw", matmul(x, kernel), bits=bits, train=train, rows=rows)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))[None]
    return y

  def _input_bits(self, bits):
    a2q_config = self.quant.a2q
    if (
      self.nonnegative_input
      and a2q_config is not None
      and a2q_config.extra_bit_after_relu
    ):
      return bits + 1
    return bits


class QuantGCNConv(_QuantLayer):
  """GCN layer (Kipf & Welling): D^-1/2 (A + I) D^-1/2 X W + b, quantized.

  Points, in order: input x, weight W, xw = XW, message norm_ij * xw_j,
  aggregate, output (after the bias), as Degree-Quant's GCNConvQuant (its
  separate "norm" point is not modelled).

  A neighbour-sampled subgraph (``graph.globals`` a `SubgraphInfo`) is
  normalised with the full graph's degrees (`sampled_gcn_normalization`).

  Attributes:
    features: output width.
    prompt: post-aggregation hook (a `LoRAP` module) or None.
    self_loops: add self-loops before normalising.
  """

  features: int = 0
  prompt: PostAggregationFn | None = None
  self_loops: bool = True

  @nn.compact
  def __call__(
    self,
    graph: jraph.GraphsTuple,
    *,
    bits=None,
    train=False,
    rows: RowMasks = ALL_ROWS,
  ):
    """Returns the graph with nodes [n_nodes, features].

    `rows` are the node row masks (padding, Degree-Quant protection); a
    message takes its sender's.
    """
    n_nodes = graph.nodes.shape[0]
    xw = QuantDense(
      features=self.features, use_bias=False, quant=self.quant, name="linear"
    )(graph.nodes, bits=bits, train=train, rows=rows)
    senders, receivers = graph.senders, graph.receivers
    info = subgraph_info(graph)
    if info is not None:
      norm = sampled_gcn_normalization(
        senders, receivers, info, self_loops=self.self_loops
      )
    if self.self_loops:
      senders, receivers = add_self_loops(senders, receivers, n_nodes)
    if info is None:
      norm = gcn_normalization(senders, receivers, n_nodes)
    messages = norm[:, None] * xw[senders]
    messages = self.qpoint(
      "message", messages, bits=bits, train=train, rows=rows.gather(senders)
    )
    aggregate = jax.ops.segment_sum(messages, receivers, num_segments=n_nodes)
    s_star = _aggregate_and_prompt(
      self,
      aggregate,
      bits=bits,
      train=train,
      rows=rows,
      additions=messages.size,
    )
    out = (
      s_star + self.param("bias", nn.initializers.zeros, (self.features,))[None]
    )
    out = self.qpoint("output", out, bits=bits, train=train, rows=rows)
    return graph._replace(nodes=out)


class QuantGINConv(_QuantLayer):
  """GIN layer: MLP((1 + eps) x_i + sum_j x_j) with a trainable eps.

  The points are those of Degree-Quant's GIN (`reddit_binary/gin.py`,
  `GINConvMultiQuant`): the message x_j, the aggregate sum_j x_j (protected
  rows as everywhere), then the MLP's own input, weight and product points
  ("input", "weight", "xw"; not mask-aware, as in the reference), and the
  output after the MLP and its BatchNorm ("update_q"). The layer input x_i
  has no point of its own: it is the previous layer's output, already on
  that grid (the first layer's raw features enter as they are). The MLP is
  Linear-ReLU-Linear-ReLU(-BatchNorm); in the first layer its first Linear
  is not quantized at all (`float_first_linear`), as in the reference.
  A2Q follows its own GIN scripts instead: that Linear quantizes its
  weight (and in node tasks its input, per node), and every later layer
  quantizes its input per channel before message passing (`A2QConfig`).
  The node-level script's update is one QLinear-ReLU; ours keeps the MLP
  every framework shares.

  A prompt acts on S = (1 + eps) x_i + S_hat, S_hat the quantized neighbour
  sum, and goes unquantized into the MLP, whose input point re-quantizes it
  (no point there before the first layer's float Linear, as in the
  reference, which keeps that Linear's input in FP32).

  Attributes:
    features: output width.
    prompt: post-aggregation hook or None.
    batch_norm: end the MLP with BatchNorm over the real (unpadded) nodes.
    float_first_linear: the first layer: its MLP's first Linear in FP32
      (A2Q quantizes that Linear's weight, and in node tasks its input),
      and no A2Q per-channel input quantizer.
  """

  features: int = 0
  prompt: PostAggregationFn | None = None
  batch_norm: bool = False
  float_first_linear: bool = False

  @nn.compact
  def __call__(
    self,
    graph: jraph.GraphsTuple,
    *,
    bits=None,
    train: bool = False,
    node_mask: jax.Array | None = None,
    protected: jax.Array | None = None,
  ):
    """Returns the graph with nodes [n_nodes, features].

    Args:
      graph: the input graph.
      bits: bit width (array).
      train: training mode.
      node_mask: bool [n_nodes], the real (unpadded) nodes.
      protected: bool [n_nodes], Degree-Quant's protected nodes. As in its
        GIN script, the MLP inside the update is not mask-aware: its
        points quantize every node (and observe every real one).
    """
    x = graph.nodes
    if isinstance(x, SparseFeatures):
      x = x.to_dense()
    x = self._a2q_input_channels(x, bits)
    n_nodes = x.shape[0]
    rows = node_row_masks(node_mask, protected)
    messages = self.qpoint(
      "message", x, bits=bits, train=train, rows=rows, index=graph.senders
    )
    neighbours = jax.ops.segment_sum(
      messages, graph.receivers, num_segments=n_nodes
    )
    neighbours = self.qpoint(
      "aggregate", neighbours, bits=bits, train=train, rows=rows
    )
    eps = self.param("eps", nn.initializers.zeros, ())
    h = _prompt_and_record(
      self, (1.0 + eps) * x + neighbours, None, additions=messages.size
    )
    real_rows = RowMasks(observe=node_mask)
    for i in range(2):
      h = QuantDense(
        features=self.features,
        quant=self._mlp_quant(i),
        nonnegative_input=i == 1,
        name=f"mlp_{i}",
      )(h, bits=bits, train=train, rows=real_rows)
      h = nn.relu(h)
    if self.batch_norm:
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(
        h, mask=quantization.per_row(node_mask, 2)
      )
    h = self.qpoint("output", h, bits=bits, train=train, rows=rows)
    return graph._replace(nodes=h)

  def _a2q_input_channels(self, x: jax.Array, bits) -> jax.Array:
    """A2Q's per-channel quantizer of a later layer's input, or `x`.

    The reference's graph-level GIN quantizes x^T with an XW quantizer
    before message passing, so the self term and the messages share it.
    """
    a2q_config = self.quant.a2q
    if (
      a2q_config is None
      or not a2q_config.gin_input_per_channel
      or self.float_first_linear
    ):
      return x
    quantized = a2q.quantize_point(
      self,
      "xw",
      x,
      bits=bits,
      config=a2q_config,
      clipped=self.quant.gradient == "clipped",
    )
    # Materialised once per node: XLA:CPU otherwise fused the quantizer into
    # the message gather and ran it again for every edge.
    return jax.lax.optimization_barrier(quantized)

  def _mlp_quant(self, i: int) -> QuantConfig:
    if i > 0 or not self.float_first_linear:
      return self.quant
    a2q_config = self.quant.a2q
    if a2q_config is None or not a2q_config.quantize_first_gin_weight:
      return quant_points.FP32
    if a2q_config.quantize_first_gin_input:
      return self.quant
    points = tuple(p for p in self.quant.points if p != "input")
    return dataclasses.replace(self.quant, points=points)


class QuantGATConv(_QuantLayer):
  """GAT layer (Velickovic et al.) with additive attention, quantized.

  Points: input x, weight W, xw = XW, message alpha_ij * xw_j, aggregate,
  output. Attention logits LeakyReLU(a_s . xw_j + a_d . xw_i) are normalised
  over each node's incoming edges with a segment softmax. The prompt sees the
  aggregate of all heads, [n_nodes, heads * features].

  Attributes:
    features: width per head.
    heads: number of attention heads.
    concat: concatenate heads (hidden layers) or average them (output).
    attention_dropout: dropout on the attention coefficients in training.
    prompt: post-aggregation hook or None.
  """

  features: int = 0
  heads: int = 1
  concat: bool = True
  attention_dropout: float = 0.0
  negative_slope: float = 0.2
  prompt: PostAggregationFn | None = None

  @nn.compact
  def __call__(
    self,
    graph: jraph.GraphsTuple,
    *,
    bits=None,
    train=False,
    rows: RowMasks = ALL_ROWS,
  ):
    """Returns the graph with nodes [n_nodes, heads * features] or
    [n_nodes, features] (concat=False); `rows` as for `QuantGCNConv`."""
    n_nodes = graph.nodes.shape[0]
    h, f = self.heads, self.features
    xw = QuantDense(
      features=h * f, use_bias=False, quant=self.quant, name="linear"
    )(graph.nodes, bits=bits, train=train, rows=rows).reshape(n_nodes, h, f)
    senders, receivers = add_self_loops(graph.senders, graph.receivers, n_nodes)
    glorot = nn.initializers.glorot_uniform()
    att_src = self.param("att_src", glorot, (1, h, f))
    att_dst = self.param("att_dst", glorot, (1, h, f))
    logits = nn.leaky_relu(
      jnp.sum(xw * att_src, -1)[senders] + jnp.sum(xw * att_dst, -1)[receivers],
      self.negative_slope,
    )
    alpha = segment_softmax(logits, receivers, n_nodes)  # [n_edges, heads]
    if train and self.attention_dropout > 0:
      alpha = Dropout(self.attention_dropout, deterministic=False)(alpha)
    messages = alpha[..., None] * xw[senders]
    messages = self.qpoint(
      "message", messages, bits=bits, train=train, rows=rows.gather(senders)
    )
    aggregate = jax.ops.segment_sum(messages, receivers, num_segments=n_nodes)
    aggregate = aggregate.reshape(n_nodes, h * f)
    s_star = _aggregate_and_prompt(
      self,
      aggregate,
      bits=bits,
      train=train,
      rows=rows,
      additions=messages.size,
    )
    if self.concat:
      out, width = s_star, h * f
    else:
      out, width = s_star.reshape(n_nodes, h, f).mean(axis=1), f
    out = out + self.param("bias", nn.initializers.zeros, (width,))[None]
    out = self.qpoint("output", out, bits=bits, train=train, rows=rows)
    return graph._replace(nodes=out)


def segment_softmax(
  logits: jax.Array, segment_ids: jax.Array, num_segments: int
) -> jax.Array:
  """Softmax of `logits` [n_edges, ...] within each segment (receiver).

  The per-segment max is subtracted first (under stop_gradient, which leaves
  the softmax unchanged) so that exp never overflows.
  """
  seg_max = jax.ops.segment_max(logits, segment_ids, num_segments=num_segments)
  shifted = logits - jax.lax.stop_gradient(seg_max)[segment_ids]
  exp = jnp.exp(shifted)
  total = jax.ops.segment_sum(exp, segment_ids, num_segments=num_segments)
  return exp / total[segment_ids]
