"""Epoch time and peak memory against graph size, on CSBM graphs.

Usage: .venv/bin/python experiments/benchmark_scaling.py [--max-nodes N]
         [--memory-limit-gb 12] [--sizes 10000,100000,...]

Every size runs in a fresh subprocess (one per training mode), so its
peak resident memory (the child's own `resource.getrusage` ru_maxrss; CPU
JAX keeps no memory statistics) is its own. A watchdog kills a run whose
resident memory passes ``--memory-limit-gb`` and the row says so; any
other failure is caught and reported too. The model is the repository's
default node-task model: a 2-layer GCN, hidden 64, INT4 plain QAT + LoRAP
(k=10, r=4), on CSBM graphs (4 classes, 32 features, average degree 10,
homophily 0.8).

* Full batch: the `train_and_evaluate` path; the epoch is one train step on
  the whole graph plus the full-graph evaluation; median over the epochs
  after the first two (which compile).
* Neighbour-sampled (``train.sampler="neighbor"``, fanouts 10, 10): 1,024
  seeds per batch; to keep the column comparable across sizes every size
  trains on 8,192 seeds (8 steps) and evaluates 2,048 validation and 2,048
  test nodes (4 batches) per epoch, so its time is per such epoch.

The last line names the largest graph that trained in each mode.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_SIZES = (10_000, 100_000, 500_000, 1_000_000, 2_000_000)
SAMPLED_TRAIN_SEEDS = 8192
SAMPLED_EVAL_SEEDS = 2048


def _child(num_nodes: int, mode: str, epochs: int) -> None:
  """Trains one size in this process and prints one JSON line."""
  import resource

  import lorap_jax

  config = lorap_jax.get_config("csbm")
  config.csbm.num_nodes = num_nodes
  config.train.epochs = epochs
  config.checkpoint.enabled = False
  if mode == "neighbor":
    config.train.sampler = "neighbor"
    config.train.fanouts = (10, 10)
    config.train.batch_size = 1024
    config.csbm.train_fraction = min(0.5, SAMPLED_TRAIN_SEEDS / num_nodes)
    config.csbm.val_fraction = min(0.2, SAMPLED_EVAL_SEEDS / num_nodes)
    config.csbm.test_fraction = min(0.2, SAMPLED_EVAL_SEEDS / num_nodes)
  start = time.perf_counter()
  dataset = lorap_jax.make_csbm(**config.csbm.to_dict())
  generate_s = time.perf_counter() - start
  num_edges = len(dataset.graph.senders)
  del dataset  # train_and_evaluate generates its own (same seed).
  with tempfile.TemporaryDirectory() as workdir:
    summary = lorap_jax.train_and_evaluate(config, workdir)
  print(
    json.dumps(
      {
        "nodes": num_nodes,
        "edges": num_edges,
        "generate_s": generate_s,
        "epoch_ms": summary["epoch_time_ms_median"],
        "test_acc": summary["test_acc_mean"],
        "self_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1e6,
      }
    )
  )


def _resident_gb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as status:
      for line in status:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1e6
  except OSError:
    pass
  return 0.0


def _run(num_nodes: int, mode: str, epochs: int, limit_gb: float) -> dict:
  """Runs one size in a subprocess under the memory watchdog."""
  process = subprocess.Popen(
    [sys.executable, __file__, "--child", str(num_nodes), mode, str(epochs)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  killed = threading.Event()

  def watch():
    while process.poll() is None:
      if _resident_gb(process.pid) > limit_gb:
        killed.set()
        process.kill()
        return
      time.sleep(0.1)

  watchdog = threading.Thread(target=watch, daemon=True)
  watchdog.start()
  stdout, stderr = process.communicate()
  watchdog.join()
  if killed.is_set():
    return {"error": f"over {limit_gb:g} GB (killed)"}
  if process.returncode != 0:
    last = (stderr.strip().splitlines() or ["?"])[-1]
    return {"error": f"failed: {last[:80]}"}
  return json.loads(stdout.strip().splitlines()[-1])


def _cell(result: dict, key: str, fmt: str) -> str:
  if "error" in result:
    return result["error"] if key == "epoch_ms" else "-"
  value = result.get(key)
  return "n/a" if value is None else format(value, fmt)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
  parser.add_argument("--max-nodes", type=int, default=None)
  parser.add_argument("--memory-limit-gb", type=float, default=12.0)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument(
    "--modes", default="full,neighbor", help="full, neighbor or both"
  )
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  if args.max_nodes is not None:
    sizes = [s for s in sizes if s <= args.max_nodes]
  modes = args.modes.split(",")
  print(
    "| nodes | edges (directed) | full batch: epoch (ms) | full batch: "
    "peak (GB) | sampled: epoch (ms) | sampled: peak (GB) |"
  )
  print("|---:|---:|---:|---:|---:|---:|")
  largest = dict.fromkeys(modes)
  for num_nodes in sizes:
    results = {}
    for mode in modes:
      results[mode] = _run(num_nodes, mode, args.epochs, args.memory_limit_gb)
      if "error" not in results[mode]:
        largest[mode] = num_nodes
    empty = {"error": "not run"}
    full, sampled = (results.get(m, empty) for m in ("full", "neighbor"))
    edges = next((r["edges"] for r in results.values() if "edges" in r), None)
    print(
      f"| {num_nodes:,} | {'?' if edges is None else f'{edges:,}'} | "
      f"{_cell(full, 'epoch_ms', ',.0f')} | "
      f"{_cell(full, 'self_peak_gb', '.2f')} | "
      f"{_cell(sampled, 'epoch_ms', ',.0f')} | "
      f"{_cell(sampled, 'self_peak_gb', '.2f')} |",
      flush=True,
    )
  for mode, size in largest.items():
    what = "none" if size is None else f"{size:,} nodes"
    print(f"Largest graph that trained ({mode}): {what}")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
  else:
    main()
