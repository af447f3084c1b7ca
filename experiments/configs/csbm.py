"""A synthetic CSBM graph (lorap_jax.make_csbm), 2-layer GCN, INT4 plain
QAT + LoRAP, full batch. Larger graphs: `config.csbm.num_nodes`, and
`config.train.sampler = "neighbor"` where full-batch training does not fit."""

import lorap_jax


def get_config():
  return lorap_jax.get_config("csbm")
