"""The fused LoRAP prompt op: reference, Pallas and jax-triton kernels."""

from lorap_jax.kernels.lorap_prompt.api import (
  AUTO,
  IMPLEMENTATIONS,
  auto_implementations,
  lorap_prompt,
  resolve_implementations,
)
from lorap_jax.kernels.lorap_prompt.config import BlockConfig, get_default
from lorap_jax.kernels.lorap_prompt.reference import (
  OUTPUT_MODES,
  dequantize_codes,
  lorap_prompt_reference,
  prompt_only_reference,
)

__all__ = [
  "AUTO",
  "IMPLEMENTATIONS",
  "OUTPUT_MODES",
  "BlockConfig",
  "auto_implementations",
  "dequantize_codes",
  "get_default",
  "lorap_prompt",
  "lorap_prompt_reference",
  "prompt_only_reference",
  "resolve_implementations",
]
