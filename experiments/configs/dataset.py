"""Any dataset's default config, by name.

Usage: ``--config=experiments/configs/dataset.py:<name>`` with a name of
`lorap_jax.DATASET_NAMES` or ``npz/<file>.npz`` for any ``.npz`` graph in
the data directory, e.g. ``dataset.py:npz/amazon_cs.npz``.
"""

import lorap_jax


def get_config(name: str = "cora"):
  return lorap_jax.get_config(name)
