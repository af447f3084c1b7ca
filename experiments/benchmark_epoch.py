"""Times one full-batch epoch (train step + evaluation) and prints a table.

Usage: LORAP_DATA_DIR=... .venv/bin/python experiments/benchmark_epoch.py

The model is the issue's: Cora, 2-layer GCN, hidden 64. Each row is timed
after two compiling epochs, as the median of `--epochs` epochs, with results
ready (block_until_ready). The PyTorch + PyG reference of the same model is
~95 ms per epoch on the same 2-core machines (the issue's figure).
"""

import argparse
import time

import jax
import numpy as np

import lorap_jax
from lorap_jax._src import train as train_lib

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
  ("Degree-Quant (default: percentiles of 16384)", "dq", {}),
  ("A2Q (learned steps and bits)", "a2q", {}),
  ("QAT, dense input", "qat", {"sparse_input": False}),
  ("MixQ search over {2, 4, 8} (dense input)", "mixq", {}),
)


def epoch_times(
  config, dataset, epochs: int, *, evaluate: bool = True
) -> np.ndarray:
  """Milliseconds per epoch (train step, then evaluation unless not
  `evaluate`), results ready, after two compiling epochs."""
  model = lorap_jax.create_model(
    config, num_classes=dataset.num_classes, task="node"
  )
  graph, eval_batch = train_lib.node_inputs(dataset, config)
  batch = lorap_jax.Batch(graph, eval_batch.labels, eval_batch.masks["train"])
  state = lorap_jax.create_train_state(
    model, lorap_jax.create_optimizer(config), graph, jax.random.key(0), 4
  )
  times = []
  for epoch in range(epochs + 2):
    start = time.perf_counter()
    state, metrics = lorap_jax.train_step(state, batch, jax.random.key(epoch))
    if evaluate:
      metrics = lorap_jax.eval_step(state, eval_batch)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) * 1e3)
  return np.asarray(times[2:])


def framework_table(dataset, steps: int) -> None:
  """Per-step time of each framework relative to plain QAT (INT4)."""
  print(f"\n| framework ({dataset.name} GCN, INT4) | ms / step | x QAT |")
  print("|---|---|---|")
  baseline = None
  for label, framework, overrides in FRAMEWORK_ROWS:
    config = lorap_jax.get_config(dataset.name)
    config.quant.framework = framework
    config.prompt.kind = "none"
    config.update_from_flattened_dict(overrides)
    median = float(
      np.median(epoch_times(config, dataset, steps, evaluate=False))
    )
    baseline = baseline or median
    print(f"| {label} | {median:.2f} | {median / baseline:.2f} |", flush=True)


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
  print("| model (Cora GCN, hidden 64) | median ms / epoch | p90 ms |")
  print("|---|---|---|")
  for label, framework, prompt, sparse in ROWS:
    config = lorap_jax.get_config(args.dataset)
    config.quant.framework = framework
    config.prompt.kind = prompt
    config.sparse_input = sparse
    times = epoch_times(config, dataset, args.epochs)
    print(
      f"| {label} | {np.median(times):.2f} | {np.percentile(times, 90):.2f} |",
      flush=True,
    )
  framework_table(dataset, args.epochs)


if __name__ == "__main__":
  main()
