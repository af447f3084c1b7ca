"""Quantized GNN models for node and graph classification."""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from lorap_jax._src import degree_quant, layers, prompts
from lorap_jax._src import quant_points as qp
from lorap_jax._src.subgraph import subgraph_info

Architecture = Literal["gcn", "gin", "gat"]
ARCHITECTURES = ("gcn", "gin", "gat")
TASKS = ("node", "graph")
READOUTS = ("mean", "sum", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Static architecture of a GNN.

  Attributes:
    architecture: "gcn", "gin" or "gat".
    task: "node" (per-node logits) or "graph" (pooled per-graph logits).
    num_classes: output width.
    hidden: hidden width (for GAT the total over heads).
    num_layers: message-passing layers.
    dropout: dropout on features before each message-passing layer.
    readout_dropout: dropout between the two readout layers (graph tasks).
    heads: GAT attention heads in hidden layers (the output layer uses one).
    attention_dropout: GAT dropout on attention coefficients.
    batch_norm: BatchNorm at the end of each GIN MLP.
    readout: graph pooling for graph tasks.
  """

  architecture: Architecture = "gcn"
  task: str = "node"
  num_classes: int = 2
  hidden: int = 64
  num_layers: int = 2
  dropout: float = 0.5
  readout_dropout: float = 0.5
  heads: int = 8
  attention_dropout: float = 0.6
  batch_norm: bool = False
  readout: str = "mean"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(
        f"model={self.architecture!r} is not one of {ARCHITECTURES}"
      )
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r} is not one of {TASKS}")
    if self.readout not in READOUTS:
      raise ValueError(f"readout={self.readout!r} is not one of {READOUTS}")
    for name in ("num_classes", "hidden", "num_layers", "heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    for name in ("dropout", "readout_dropout", "attention_dropout"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1)")
    if self.architecture == "gat" and self.hidden % self.heads:
      raise ValueError(
        f"hidden={self.hidden} must be a multiple of heads={self.heads}"
      )


def feature_dropout(
  module: nn.Module, x: layers.Features, rate: float, train: bool
):
  """Dropout on dense features, or on the non-zeros of sparse ones."""
  if not train or rate == 0.0:
    return x
  drop = layers.Dropout(rate, deterministic=False)
  if isinstance(x, layers.SparseFeatures):
    return x.replace_values(drop(x.values))
  return drop(x)


class GNN(nn.Module):
  """A quantized GCN / GIN / GAT with optional GPF and LoRAP prompts.

  Node tasks: [dropout -> conv -> ReLU] x (L - 1), dropout -> conv, giving
  per-node logits. Graph tasks: L hidden convs, a masked readout over each
  graph, then Linear-ReLU-dropout-Linear (both quantized), as Degree-Quant's
  GIN. GPF / GPF-plus act on the input features; LoRAP after every
  aggregation, or (`prompt.position="pre"`) on every layer's input.

  Attributes:
    model: the architecture.
    quant: the fake-quantization config (FP32 when disabled).
    prompt: the prompt config.
  """

  model: ModelConfig
  quant: qp.QuantConfig = qp.FP32
  prompt: prompts.PromptConfig = prompts.PromptConfig()

  @nn.compact
  def __call__(
    self, graph: jraph.GraphsTuple, *, bits=None, train: bool = False
  ) -> jax.Array:
    """Logits: [n_nodes, num_classes] (node) or [n_graphs, num_classes].

    Args:
      graph: nodes are dense [n_nodes, f] or `SparseFeatures`; senders and
        receivers hold both directions of every edge, without self-loops.
      bits: bit width (array) for every active quantization point.
      train: training mode (dropout on, ranges and BatchNorm stats updated;
        needs the "dropout" rng, the "protect" rng under Degree-Quant, and
        mutable collections).
    """
    if self.quant.enabled and bits is None:
      raise ValueError("bits must be given when quantization is enabled")
    cfg = self.model
    node_mask = None
    if cfg.task == "graph":
      node_mask = jraph.get_node_padding_mask(graph)
    elif subgraph_info(graph) is not None:
      # A padded, neighbour-sampled subgraph: padding sets no range.
      node_mask = subgraph_info(graph).node_mask
    protection = self._protection_probability(graph, train)
    protected = None
    widths = self._layer_widths()
    for i, width in enumerate(widths):
      last_layer = cfg.task == "node" and i == len(widths) - 1
      x = feature_dropout(self, graph.nodes, cfg.dropout, train)
      graph = graph._replace(nodes=x)
      if i == 0:
        # The node prompt is a parameter, not data: it goes in after the
        # input dropout, which would otherwise scatter it across features.
        graph = self._prompt_inputs(graph)
      graph = self._prompt_layer_input(i, graph)
      if protection is not None and (
        protected is None or self.quant.protection.per_layer
      ):
        protected = degree_quant.sample_protection(
          self.make_rng("protect"), protection
        )
      conv = self._conv(i, width, last_layer)
      if cfg.architecture == "gin":
        graph = conv(
          graph,
          bits=bits,
          train=train,
          node_mask=node_mask,
          protected=protected,
        )
      else:
        rows = layers.node_row_masks(node_mask, protected)
        graph = conv(graph, bits=bits, train=train, rows=rows)
      if not last_layer and cfg.architecture != "gin":
        # GIN's MLP already ends in ReLU (and BatchNorm).
        graph = graph._replace(nodes=nn.relu(graph.nodes))
    if cfg.task == "node":
      return graph.nodes
    return self._readout(graph, bits=bits, train=train)

  def _protection_probability(self, graph, train: bool) -> jax.Array | None:
    """Degree-Quant's per-node protection probability, in training only.

    Computed on the input graph (before any self-loops), per graph of a
    batch, as the reference's dataset transform does.
    """
    if not (train and self.quant.enabled and self.quant.protection):
      return None
    return degree_quant.protection_probability(graph, self.quant.protection)

  def _layer_widths(self) -> list[int]:
    cfg = self.model
    widths = [cfg.hidden] * cfg.num_layers
    if cfg.task == "node":
      widths[-1] = cfg.num_classes
    return widths

  def aggregate_widths(self, num_features: int) -> tuple[int, ...]:
    """Per layer, the width of the aggregate a LoRAP prompt acts on.

    GCN and GAT aggregate the layer's transformed features (a node task's
    last layer: ``num_classes`` wide); GIN aggregates the layer's input, so
    its first aggregate has the dataset's `num_features` columns. With
    ``prompt.position == "pre"`` LoRAP acts on every layer's input instead,
    and these are the input widths.
    """
    widths = self._layer_widths()
    if self.model.architecture == "gin" or self.prompt.position == "pre":
      return (num_features, *widths[:-1])
    return tuple(widths)

  def _prompt_inputs(self, graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    kind = self.prompt.node_prompt
    if kind is None:
      return graph
    x = graph.nodes
    if isinstance(x, layers.SparseFeatures):
      x = x.to_dense()  # A node prompt makes every feature non-zero.
    if kind == "gpf":
      x = prompts.GPF(name="gpf")(x)
    else:
      x = prompts.GPFPlus(self.prompt.num_prompts, name="gpf_plus")(x)
    return graph._replace(nodes=x)

  def _prompt_layer_input(
    self, i: int, graph: jraph.GraphsTuple
  ) -> jraph.GraphsTuple:
    """LoRAP on layer i's input, when it acts before aggregation ("pre").

    The prompted features go into the layer unquantized: its input
    quantizer (where the framework has one there) puts them on its grid,
    as the aggregate quantizer re-quantizes a post-aggregation prompt.
    """
    if self.prompt.position != "pre":
      return graph
    lorap = self._lorap(i)
    if lorap is None:
      return graph
    x = graph.nodes
    if isinstance(x, layers.SparseFeatures):
      x = x.to_dense()  # The prompt makes every feature non-zero.
    return graph._replace(nodes=lorap(x))

  def _post_aggregation_prompt(self, i: int):
    if self.prompt.position != "post":
      return None
    return self._lorap(i)

  def _lorap(self, i: int):
    if not self.prompt.uses_lorap:
      return None
    return prompts.LoRAP(
      num_prompts=self.prompt.num_prompts,
      rank=self.prompt.rank,
      basis_init=self.prompt.init,
      implementation=self.prompt.implementation,
      name=f"lorap_{i}",
    )

  def _layer_quant(self, i: int) -> qp.QuantConfig:
    """Layer i's quantization, as each framework's reference places points.

    A2Q leaves the first layer's input (0/1 bag-of-words) unquantized (a
    GIN layer has no input point of its own, and A2Q's GIN quantizes the
    input of every Linear but the first layer's first, as ours); MixQ
    quantizes the input of the first layer only (later inputs are the
    previous aggregate, already on a grid; its GIN Linears quantize weights
    and outputs only).
    """
    a2q_config = self.quant.a2q
    skip_first_input = (
      a2q_config is not None
      and not a2q_config.quantize_first_input
      and self.model.architecture != "gin"
    )
    skip_input = (i == 0 and skip_first_input) or (
      i > 0 and self.quant.mixq is not None
    )
    if not skip_input:
      return self.quant
    points = tuple(p for p in self.quant.points if p != "input")
    return dataclasses.replace(self.quant, points=points)

  def _conv(self, i: int, width: int, last_layer: bool) -> nn.Module:
    cfg = self.model
    common = dict(
      quant=self._layer_quant(i),
      prompt=self._post_aggregation_prompt(i),
      name=f"conv_{i}",
    )
    if cfg.architecture == "gcn":
      return layers.QuantGCNConv(features=width, **common)
    if cfg.architecture == "gin":
      return layers.QuantGINConv(
        features=width,
        batch_norm=cfg.batch_norm,
        float_first_linear=i == 0,
        **common,
      )
    heads = 1 if last_layer else cfg.heads
    return layers.QuantGATConv(
      features=width // heads,
      heads=heads,
      concat=not last_layer,
      attention_dropout=cfg.attention_dropout,
      **common,
    )

  def _readout(self, graph: jraph.GraphsTuple, *, bits, train) -> jax.Array:
    cfg = self.model
    pooled = pool_graphs(graph, cfg.readout)
    # Padding graphs must not widen (or, for percentiles, shift) ranges.
    rows = layers.RowMasks(observe=jraph.get_graph_padding_mask(graph))
    h = layers.QuantDense(
      features=cfg.hidden, quant=self.quant, name="readout_0"
    )(pooled, bits=bits, train=train, rows=rows)
    h = nn.relu(h)
    h = feature_dropout(self, h, cfg.readout_dropout, train)
    return layers.QuantDense(
      features=cfg.num_classes,
      quant=self.quant,
      nonnegative_input=True,
      name="readout_1",
    )(h, bits=bits, train=train, rows=rows)


def pool_graphs(graph: jraph.GraphsTuple, readout: str) -> jax.Array:
  """Per-graph mean / sum / max of node features, [n_graphs, features]."""
  n_graphs = graph.n_node.shape[0]
  n_nodes = graph.nodes.shape[0]
  graph_ids = jnp.repeat(
    jnp.arange(n_graphs), graph.n_node, total_repeat_length=n_nodes
  )
  if readout == "max":
    pooled = jax.ops.segment_max(graph.nodes, graph_ids, n_graphs)
    # Empty (padding) graphs give -inf; keep the logits finite.
    return jnp.where(jnp.isfinite(pooled), pooled, 0.0)
  total = jax.ops.segment_sum(graph.nodes, graph_ids, n_graphs)
  if readout == "sum":
    return total
  count = jnp.maximum(graph.n_node, 1).astype(total.dtype)
  return total / count[:, None]


def count_parameters(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
