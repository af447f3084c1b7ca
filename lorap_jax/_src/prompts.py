"""Prompts: GPF and GPF-plus on node features, LoRAP after aggregation."""

import dataclasses
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorap_jax.kernels.lorap_prompt import lorap_prompt

PromptKind = Literal["none", "gpf", "gpf-plus", "lorap", "gpf-lorap"]
PROMPT_KINDS = ("none", "gpf", "gpf-plus", "lorap", "gpf-lorap")
LORAP_INITS = ("lora", "glorot")
# Where LoRAP acts: after each aggregation (the paper's method), or on each
# layer's input before it is aggregated (the ablation of lorap.md, 1).
LORAP_POSITIONS = ("post", "pre")

# Module-name prefixes of prompt parameters: the optimizer gives them their
# own learning rate, and freezing the backbone masks everything else.
PROMPT_MODULE_PREFIXES = ("lorap", "gpf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
  """Which prompts a model carries (static).

  Attributes:
    kind: "none", "gpf", "gpf-plus", "lorap" or "gpf-lorap".
    num_prompts: k, basis prompts of GPF-plus and of LoRAP.
    rank: r, the rank of LoRAP's basis P_A @ P_B.
    init: "lora" (P_B zero: the prompt starts as a no-op, the default) or
      "glorot" (both factors glorot, the GPF-plus style, for ablation).
    position: where LoRAP acts: "post" (after every aggregation, on the
      dequantized aggregate, re-quantized on its grid: the paper's method
      and the default) or "pre" (the same module on every message-passing
      layer's input, before the layer transforms and aggregates it; the
      layer's input quantizer, where it has one, quantizes the prompted
      features). "pre" is the ablation that `lorap.md` (1) argues cannot
      fix the aggregation error: the prompt reaches the aggregate only
      through A.
    implementation: the fused-prompt implementation: "auto" (the default;
      None means the same: triton on a CUDA GPU of compute capability >= 8.0,
      else pallas on a GPU, else xla), "xla", "pallas", "triton", or a tuple
      of them to try in order (see `lorap_jax.kernels.lorap_prompt`).
  """

  kind: PromptKind = "none"
  num_prompts: int = 10
  rank: int = 4
  init: str = "lora"
  position: str = "post"
  implementation: str | tuple[str, ...] | None = "auto"

  def __post_init__(self):
    if self.kind not in PROMPT_KINDS:
      raise ValueError(f"prompt={self.kind!r} is not one of {PROMPT_KINDS}")
    if self.init not in LORAP_INITS:
      raise ValueError(f"init={self.init!r} is not one of {LORAP_INITS}")
    if self.position not in LORAP_POSITIONS:
      raise ValueError(
        f"position={self.position!r} is not one of {LORAP_POSITIONS}"
      )
    for name in ("num_prompts", "rank"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")

  @property
  def node_prompt(self) -> str | None:
    """The input-feature prompt: "gpf", "gpf-plus" or None."""
    return {"gpf": "gpf", "gpf-plus": "gpf-plus", "gpf-lorap": "gpf-plus"}.get(
      self.kind
    )

  @property
  def uses_lorap(self) -> bool:
    return self.kind in ("lorap", "gpf-lorap")


def torch_linear_init(fan_in_axis: int = 0):
  """PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = shape[fan_in_axis]
    bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, dtype))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _glorot_vector(key, shape, dtype=jnp.float32):
  # GPF's glorot on a [1, F] matrix: fan_in 1, fan_out F.
  return nn.initializers.glorot_uniform()(key, (1, *shape), dtype)[0]


class GPF(nn.Module):
  """GPF: one learned vector added to every node's features, x_i + p.

  Examples:
    >>> x = jnp.ones((5, 3))
    >>> variables = GPF().init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'prompt': (3,)}
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [n_nodes, features] -> [n_nodes, features]."""
    prompt = self.param("prompt", _glorot_vector, (x.shape[-1],))
    return x + prompt.astype(x.dtype)[None]


class GPFPlus(nn.Module):
  """GPF-plus: x_i + sum_j softmax(a(x_i))_j p_j with k learned bases.

  Attributes:
    num_prompts: k.

  Examples:
    >>> x = jnp.ones((5, 3))
    >>> variables = GPFPlus(num_prompts=4).init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'basis': (4, 3), 'scorer': {'bias': (4,), 'kernel': (3, 4)}}
  """

  num_prompts: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [n_nodes, features] -> [n_nodes, features]."""
    features = x.shape[-1]
    basis = self.param(
      "basis", nn.initializers.glorot_uniform(), (self.num_prompts, features)
    )
    # GPF's scorer is a PyTorch nn.Linear with bias and its default init.
    scores = nn.Dense(
      self.num_prompts,
      kernel_init=torch_linear_init(),
      bias_init=lambda key, shape, dtype=jnp.float32: torch_linear_init()(
        key, (features, *shape), dtype
      )[0],
      name="scorer",
    )(x)
    return x + jax.nn.softmax(scores, axis=-1) @ basis


class LoRAP(nn.Module):
  """Low-rank aggregation prompt, applied right after aggregation.

  alpha = softmax(S_hat @ W_phi + b_phi); P = (alpha @ P_A) @ P_B;
  S_star = Q_agg(S_hat + P). Parameters: d*k + k (weight generator) and
  r*(k + d) (the rank-r basis). With the default "lora" init P_B is zero, so
  the prompt starts as a no-op.

  Attributes:
    num_prompts: k, the number of basis prompts.
    rank: r.
    basis_init: "lora" or "glorot" (see `PromptConfig.init`).
    implementation: which fused-prompt implementation runs ("auto" by
      default; see `PromptConfig.implementation`).

  Examples:
    >>> s_hat = jnp.ones((5, 8))
    >>> module = LoRAP(num_prompts=4, rank=2)
    >>> variables = module.init(jax.random.key(0), s_hat)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'b_phi': (4,), 'p_a': (4, 2), 'p_b': (2, 8), 'w_phi': (8, 4)}
  """

  num_prompts: int
  rank: int
  basis_init: str = "lora"
  implementation: str | tuple[str, ...] | None = "auto"

  @nn.compact
  def __call__(
    self,
    s_hat: jax.Array,
    requantize: Callable[[jax.Array], jax.Array] | None = None,
  ) -> jax.Array:
    """Prompts and re-quantizes a dequantized aggregate.

    Args:
      s_hat: [n_nodes, d], the aggregate on the aggregate quantizer's grid.
      requantize: the aggregate quantizer (None in FP32).

    Returns:
      S_star, [n_nodes, d].
    """
    d = s_hat.shape[-1]
    glorot = nn.initializers.glorot_uniform()
    # One shared linear weight generator: glorot kernel, zero bias.
    w_phi = self.param("w_phi", glorot, (d, self.num_prompts))
    b_phi = self.param("b_phi", nn.initializers.zeros, (self.num_prompts,))
    p_a = self.param("p_a", glorot, (self.num_prompts, self.rank))
    b_init = nn.initializers.zeros if self.basis_init == "lora" else glorot
    p_b = self.param("p_b", b_init, (self.rank, d))
    prompted = lorap_prompt(
      s_hat, w_phi, b_phi, p_a, p_b, implementation=self.implementation
    )
    # In training the re-quantizer's range must observe the prompted values
    # first, so the grid cannot be fused in here; a frozen-range fused path
    # is the kernel's business.
    return prompted if requantize is None else requantize(prompted)


def lorap_parameter_count(d: int, num_prompts: int, rank: int) -> int:
  """Parameters of one LoRAP layer: d*k + k + r*(k + d)."""
  return d * num_prompts + num_prompts + rank * (num_prompts + d)
