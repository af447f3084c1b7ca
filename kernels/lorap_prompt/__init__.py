"""The fused LoRAP prompt op (reference now; Pallas and Triton plug in)."""

from lorap_jax.kernels.lorap_prompt.api import IMPLEMENTATIONS, lorap_prompt
from lorap_jax.kernels.lorap_prompt.reference import (
  lorap_prompt_reference,
  prompt_only_reference,
)

__all__ = [
  "IMPLEMENTATIONS",
  "lorap_prompt",
  "lorap_prompt_reference",
  "prompt_only_reference",
]
