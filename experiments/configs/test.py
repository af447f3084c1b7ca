"""A CPU-sized config for smoke tests: Cora, 2 seeds x 5 epochs."""

import lorap_jax


def get_config():
  config = lorap_jax.get_config("cora")
  # --- Runs ---------------------------------------------------------------
  config.seeds = 2
  config.train.epochs = 5
  # --- Model --------------------------------------------------------------
  config.model.hidden = 16
  return config
