"""Thin entry point: `python experiments/main.py --config=... --workdir=...`.

Example:
  python experiments/main.py --config=experiments/configs/default.py \
    --workdir=runs/cora --config.quant.bits=8
"""

from absl import app, flags
from ml_collections import config_flags

import lorap_jax

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
config_flags.DEFINE_config_file(
  "config", None, "Path to a config file.", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  summary = lorap_jax.train_and_evaluate(
    flags.FLAGS.config, _WORKDIR.value, progress=True
  )
  print(
    f"test accuracy {100 * summary['test_acc_mean']:.2f} "
    f"± {100 * summary['test_acc_std']:.2f} %"
  )


if __name__ == "__main__":
  app.run(main)
