"""REDDIT-BINARY, 5-layer GIN on standardised degrees, INT4 plain QAT +
LoRAP, Degree-Quant protocol."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("reddit-binary")
