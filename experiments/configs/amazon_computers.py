"""Amazon Computers, 2-layer GCN, INT4 plain QAT + LoRAP; Shchur et al.'s
random 20/30-per-class split, redrawn for each of the 10 seeds."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("amazon-computers")
