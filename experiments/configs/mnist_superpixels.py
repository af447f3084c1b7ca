"""MNIST superpixels (recomputed with SLIC), 4-layer GIN x 110, INT4 plain
QAT + LoRAP, benchmarking-gnns' settings; the graphs are built and cached on
first use (needs the `datasets` extra)."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("mnist-superpixels")
