"""Throughput of a 32-configuration sweep: vmapped against one at a time.

Usage: LORAP_DATA_DIR=... .venv/bin/python experiments/benchmark_sweep.py

The grid is Cora, 2-layer GCN (hidden 64), INT4 QAT + LoRAP: 4 seeds x 4
backbone learning rates x 2 prompt learning rates = 32 runs of `--epochs`
epochs, trained as below. `--dataset` takes any dataset with its config's
model; a graph dataset runs every configuration on its first fold
(mini-batches, `lorap_jax._src.graph_sweep`).

- "train_and_evaluate, one after another": the library path a user would
  otherwise take, one call per (learning rate, prompt learning rate) with
  `config.seeds = 4` (8 calls, 32 runs), checkpoints off, no progress bar.
  Its wall time includes what that path does besides the epochs (its
  compiles: the learning rates live in the optimizer state, so the first
  call compiles and the other seven reuse the programs; dataset loading;
  per-epoch host work and logging). Its "train"
  time is the library's own steady-state figure: the median epoch time
  (train step + evaluation, results ready, after the two compiling epochs)
  x epochs x runs, so compiles and per-epoch host work are left out.
- "sweep": `run_sweep` with each of `--chunk-sizes` runs per call. 1 (its
  CPU default) is `make_sweep_run` jitted unvmapped: the epochs in a
  `lax.scan`, one compile for all 32 runs, called per run. Above 1, chunks
  of that many runs vmapped in one program.

With several devices (on a CPU: ``XLA_FLAGS=
--xla_force_host_platform_device_count=2``), one more row splits the
runs over all of them (`run_sweep`'s default), one run per device per call.

Compile time is reported apart, and the speed-ups are given both ways:
wall time with everything (compiles included in both), and train time only
(compiles excluded from both).
"""

import argparse
import resource
import tempfile
import time

import jax
import numpy as np

import lorap_jax

SEEDS = (0, 1, 2, 3)
LEARNING_RATES = (0.02, 0.01, 0.005, 0.0025)
PROMPT_LEARNING_RATES = (0.001, 0.003)


def base_config(dataset: str, epochs: int):
  config = lorap_jax.get_config(dataset)
  config.quant.framework = "qat"
  config.quant.bits = 4
  config.prompt.kind = "lorap"
  config.train.epochs = epochs
  config.checkpoint.enabled = False
  if not lorap_jax.is_node_dataset(dataset):
    config.folds = 1  # Graph datasets: every run on the first fold.
  return config


def sequential_library(config) -> dict:
  """The 32 runs as 8 `train_and_evaluate` calls of 4 seeds each."""
  config.seeds = len(SEEDS)
  start = time.perf_counter()
  steady_ms = 0.0
  accuracies = []
  for lr in LEARNING_RATES:
    for prompt_lr in PROMPT_LEARNING_RATES:
      config.train.learning_rate = lr
      config.prompt.learning_rate = prompt_lr
      with tempfile.TemporaryDirectory() as workdir:
        summary = lorap_jax.train_and_evaluate(config, workdir)
      steady_ms += (
        summary["epoch_time_ms_median"] * config.train.epochs * len(SEEDS)
      )
      accuracies += summary["test_accs"]
  wall = time.perf_counter() - start
  return {
    "compile": None,
    "train": steady_ms / 1e3,
    "wall": wall,
    "test_acc": float(np.mean(accuracies)),
  }


def vmapped_sweep(config, chunk_size: int | None, devices: int | None) -> dict:
  grid = {
    "seed": SEEDS,
    "learning_rate": LEARNING_RATES,
    "prompt_learning_rate": PROMPT_LEARNING_RATES,
  }
  start = time.perf_counter()
  result = lorap_jax.run_sweep(
    config, grid, chunk_size=chunk_size, devices=devices
  )
  return {
    "compile": sum(result.compile_seconds),
    "train": sum(result.run_seconds),
    "wall": time.perf_counter() - start,
    "test_acc": float(np.mean([row["test_acc"] for row in result.rows])),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dataset", default="cora")
  parser.add_argument("--epochs", type=int, default=200)
  parser.add_argument(
    "--chunk-sizes",
    default="1,8,32",
    help="comma-separated chunk sizes, one sweep row each",
  )
  parser.add_argument(
    "--skip-library",
    action="store_true",
    help="leave out the (slowest) train_and_evaluate row",
  )
  args = parser.parse_args()
  config = base_config(args.dataset, args.epochs)
  runs = len(SEEDS) * len(LEARNING_RATES) * len(PROMPT_LEARNING_RATES)
  print(
    f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
    f"{args.dataset} {config.model.architecture.upper()} INT4 QAT + LoRAP, "
    f"{runs} runs x {args.epochs} epochs"
  )
  rows = {}
  if not args.skip_library:
    rows["train_and_evaluate, one after another"] = sequential_library(
      base_config(args.dataset, args.epochs)
    )
  for chunk_size in (int(c) for c in args.chunk_sizes.split(",")):
    name = (
      "sweep, one run per call (CPU default)"
      if chunk_size == 1
      else f"sweep, vmapped chunks of {chunk_size}"
    )
    rows[name] = vmapped_sweep(config, chunk_size, devices=1)
  if jax.device_count() > 1:
    name = f"sweep, one run per device per call ({jax.device_count()} devices)"
    rows[name] = vmapped_sweep(config, None, devices=None)
  baseline = next(iter(rows.values()))
  print(
    "\n| path | compile s | train s | wall s | runs/s (wall) "
    "| runs/s (train) | speed-up (wall) | speed-up (train) | mean test acc |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name, row in rows.items():
    compile_text = "—" if row["compile"] is None else f"{row['compile']:.1f}"
    print(
      f"| {name} | {compile_text} | {row['train']:.1f} | {row['wall']:.1f} "
      f"| {runs / row['wall']:.3f} | {runs / row['train']:.3f} "
      f"| {baseline['wall'] / row['wall']:.2f}x "
      f"| {baseline['train'] / row['train']:.2f}x "
      f"| {100 * row['test_acc']:.1f} % |"
    )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"\npeak resident memory of the process: {peak:.2f} GiB")


if __name__ == "__main__":
  main()
