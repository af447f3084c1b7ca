"""Runs the foundation results table of README.md and prints it as Markdown.

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/foundation_table.py --out experiments/results
  .venv/bin/python experiments/foundation_table.py --quick   # a smoke run

Node tasks: 2-layer GCN, hidden 64, public split, 10 seeds, 200 epochs,
test accuracy at the best-validation-accuracy epoch. Graph task: 5-layer GIN,
hidden 64, 10 folds (Degree-Quant protocol: validation fold = previous test
fold), test accuracy at the lowest-validation-loss epoch.
"""

import argparse
import json
import pathlib

import lorap_jax

NODE_ROWS = (
  ("FP32", "fp32", "none"),
  ("INT4 QAT", "qat", "none"),
  ("INT4 QAT + GPF-plus", "qat", "gpf-plus"),
  ("INT4 QAT + LoRAP", "qat", "lorap"),
  ("INT4 QAT + GPF-LoRAP", "qat", "gpf-lorap"),
)
GRAPH_ROWS = (
  ("FP32", "fp32", "none"),
  ("INT4 QAT", "qat", "none"),
  ("INT4 QAT + LoRAP", "qat", "lorap"),
)


def run(dataset, framework, prompt, out, quick, graph_epochs, reuse=False):
  workdir = out / f"{dataset}-{framework}-{prompt}"
  if reuse and (workdir / "summary.json").exists():
    return json.loads((workdir / "summary.json").read_text())
  config = lorap_jax.get_config(dataset)
  config.quant.framework = framework
  config.prompt.kind = prompt
  if not lorap_jax.is_node_dataset(dataset):
    config.train.epochs = graph_epochs
  if quick:
    config.seeds, config.folds, config.train.epochs = 2, 2, 5
  # A run that died part-way continues from its checkpoints.
  resume = any((workdir / "checkpoints").glob("*"))
  return lorap_jax.train_and_evaluate(config, workdir, resume=resume)


def cell(summary):
  return (
    f"{100 * summary['test_acc_mean']:.1f} ± "
    f"{100 * summary['test_acc_std']:.1f}"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="runs/foundation")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--graph-dataset", default="proteins")
  parser.add_argument("--graph-epochs", type=int, default=200)
  parser.add_argument("--skip-node", action="store_true")
  parser.add_argument("--skip-graph", action="store_true")
  parser.add_argument(
    "--reuse",
    action="store_true",
    help="Read rows whose summary.json already exists instead of rerunning.",
  )
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  results = {}
  if not args.skip_node:
    print("| setting | Cora | CiteSeer | ms / epoch (Cora) |")
    print("|---|---|---|---|")
    for label, framework, prompt in NODE_ROWS:
      cora = run("cora", framework, prompt, out, args.quick, 0, args.reuse)
      citeseer = run(
        "citeseer", framework, prompt, out, args.quick, 0, args.reuse
      )
      results[f"node/{label}"] = [cora, citeseer]
      print(
        f"| {label} | {cell(cora)} | {cell(citeseer)} | "
        f"{cora['epoch_time_ms_median']:.1f} |",
        flush=True,
      )
  if not args.skip_graph:
    name = args.graph_dataset
    print(f"\n| setting | {name} (GIN, 10-fold) | ms / epoch |")
    print("|---|---|---|")
    for label, framework, prompt in GRAPH_ROWS:
      summary = run(
        name, framework, prompt, out, args.quick, args.graph_epochs, args.reuse
      )
      results[f"graph/{label}"] = [summary]
      print(
        f"| {label} | {cell(summary)} | "
        f"{summary['epoch_time_ms_median']:.1f} |",
        flush=True,
      )
  for runs in results.values():
    for summary in runs:
      summary.pop("states", None)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
