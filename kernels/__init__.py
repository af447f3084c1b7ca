"""Fused kernels of lorap_jax, importable as `lorap_jax.kernels`."""

from lorap_jax.kernels.lorap_prompt import (
  IMPLEMENTATIONS,
  BlockConfig,
  lorap_prompt,
  lorap_prompt_reference,
)

__all__ = [
  "IMPLEMENTATIONS",
  "BlockConfig",
  "lorap_prompt",
  "lorap_prompt_reference",
]
