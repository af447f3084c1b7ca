"""PROTEINS (GIN format), 5-layer GIN, INT4 plain QAT + LoRAP, Degree-Quant
protocol."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("proteins")
