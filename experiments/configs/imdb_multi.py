"""IMDB-MULTI, 5-layer GIN on one-hot degrees, INT4 plain QAT + LoRAP,
Degree-Quant protocol."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("imdb-multi")
