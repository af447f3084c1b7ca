"""AqSol graph regression (MAE), 4-layer GIN x 110, INT4 plain QAT + LoRAP,
benchmarking-gnns' settings (needs the `datasets` extra for RDKit)."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("aqsol")
