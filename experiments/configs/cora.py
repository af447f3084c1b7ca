"""Cora, 2-layer GCN, INT4 plain QAT + LoRAP (Kipf & Welling's protocol)."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("cora")
