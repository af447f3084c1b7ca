"""Times one full-batch epoch (train step + evaluation) and prints a table.

Usage: LORAP_DATA_DIR=... .venv/bin/python experiments/benchmark_epoch.py

The model is the issue's: Cora, 2-layer GCN, hidden 64. Each row is timed
after two compiling epochs, as the median of `--epochs` epochs, with results
ready (block_until_ready); the rows take turns in blocks of 25 epochs, so
machine drift hits them alike. The PyTorch + PyG reference of the same model is
~95 ms per epoch on the same 2-core machines (the issue's figure). A second
table gives each QAT framework's train step relative to plain QAT.
"""

import argparse
import time

import jax
import numpy as np

import lorap_jax
from lorap_jax._src import runs as runs_lib

ROWS = (
  ("FP32", "fp32", "none", True),
  ("INT4 QAT", "qat", "none", True),
  ("INT4 QAT + LoRAP", "qat", "lorap", True),
  ("INT4 QAT + LoRAP, dense input", "qat", "lorap", False),
)
FRAMEWORK_ROWS = (
  ("QAT", "qat", {}),
  ("Degree-Quant, exact percentiles", "dq", {"dq.sample_size": 0}),
  ("Degree-Quant, percentiles of 65536", "dq", {"dq.sample_size": 65536}),
  ("Degree-Quant, percentiles of 16384", "dq", {"dq.sample_size": 16384}),
  ("Degree-Quant (default: percentiles of 8192)", "dq", {}),
  ("A2Q (learned steps and bits)", "a2q", {}),
  ("QAT, dense input", "qat", {"sparse_input": False}),
  ("MixQ search over {2, 4, 8} (dense input)", "mixq", {}),
)


def make_epoch(config, dataset, *, evaluate: bool = True):
  """Returns a function that runs one more epoch (train step, then the
  evaluation unless not `evaluate`) and its milliseconds, results ready."""
  model = lorap_jax.create_model(
    config, num_classes=dataset.num_classes, task="node"
  )
  graph, eval_batch = runs_lib.node_inputs(dataset, config)
  batch = lorap_jax.Batch(graph, eval_batch.labels, eval_batch.masks["train"])
  state = lorap_jax.create_train_state(
    model, lorap_jax.create_optimizer(config), graph, jax.random.key(0), 4
  )
  epoch = 0

  dropout_key = jax.random.key(1)

  def run_epoch() -> float:
    nonlocal state, epoch
    # As in the training loop, the epoch's key is made before the clock starts.
    rng = jax.random.fold_in(dropout_key, epoch)
    start = time.perf_counter()
    state, metrics = lorap_jax.train_step(state, batch, rng)
    if evaluate:
      metrics = lorap_jax.eval_step(state, eval_batch)
    jax.block_until_ready(metrics)
    epoch += 1
    return (time.perf_counter() - start) * 1e3

  return run_epoch


def interleaved_medians(epoch_fns, epochs: int, block: int = 25) -> list[float]:
  """Median ms per epoch of each function, after two compiling epochs.

  The functions take turns in blocks of `block` consecutive epochs: within
  a block a row runs in steady state, as in training, and a drift of the
  machine (other load, clock changes) is spread over every row alike.
  """
  for run_epoch in epoch_fns:
    run_epoch(), run_epoch()
  times = [[] for _ in epoch_fns]
  while len(times[0]) < epochs:
    count = min(block, epochs - len(times[0]))
    for row, run_epoch in zip(times, epoch_fns, strict=True):
      row.extend(run_epoch() for _ in range(count))
  return [float(np.median(row)) for row in times]


def _config(dataset, framework, prompt, overrides=None):
  config = lorap_jax.get_config(dataset.name)
  config.quant.framework = framework
  config.prompt.kind = prompt
  config.update_from_flattened_dict(overrides or {})
  return config


def framework_table(dataset, steps: int) -> None:
  """Per-step time of each framework relative to plain QAT (INT4)."""
  print(f"\n| framework ({dataset.name} GCN, INT4) | ms / step | x QAT |")
  print("|---|---|---|")
  steppers = [
    make_epoch(
      _config(dataset, framework, "none", over), dataset, evaluate=False
    )
    for _, framework, over in FRAMEWORK_ROWS
  ]
  medians = interleaved_medians(steppers, steps)
  for (label, _, _), median in zip(FRAMEWORK_ROWS, medians, strict=True):
    print(f"| {label} | {median:.2f} | {median / medians[0]:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dataset", default="cora")
  parser.add_argument("--epochs", type=int, default=200)
  parser.add_argument(
    "--frameworks-only",
    action="store_true",
    help="Print only the per-step table of the QAT frameworks.",
  )
  args = parser.parse_args()
  dataset = lorap_jax.load_dataset(args.dataset)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  if args.frameworks_only:
    framework_table(dataset, args.epochs)
    return
  print("| model (Cora GCN, hidden 64) | median ms / epoch |")
  print("|---|---|")
  epochs = [
    make_epoch(
      _config(dataset, framework, prompt, {"sparse_input": sparse}), dataset
    )
    for _, framework, prompt, sparse in ROWS
  ]
  medians = interleaved_medians(epochs, args.epochs)
  for (label, *_), median in zip(ROWS, medians, strict=True):
    print(f"| {label} | {median:.2f} |")
  framework_table(dataset, args.epochs)


if __name__ == "__main__":
  main()
