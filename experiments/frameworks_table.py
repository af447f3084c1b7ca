"""Runs the QAT-frameworks tables of README.md and prints them as Markdown.

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/frameworks_table.py --out runs/frameworks
  .venv/bin/python experiments/frameworks_table.py --skip-node \\
      --graph-folds 10 --graph-epochs 200        # the full REDDIT protocol

Node tasks: 2-layer GCN, hidden 64, public split, 10 seeds, INT4 (A2Q
starts at 4 bits and learns them; MixQ searches {2, 4, 8}), test accuracy at
the best-validation-accuracy epoch, each framework without a prompt, with
LoRAP and with GPF-LoRAP. Graph task: REDDIT-BINARY, GIN 5 x 64, INT4
Degree-Quant with the reference's hyper-parameters (lr 0.001, weight decay
4e-5, p in [0.1, 0.2], 1% percentiles), with and without LoRAP, test
accuracy at the lowest-validation-loss epoch.
"""

import argparse
import json
import pathlib

from foundation_table import cell

import lorap_jax

FRAMEWORKS = ("qat", "dq", "a2q", "mixq")
PROMPTS = ("none", "lorap", "gpf-lorap")


def framework_figure(summary) -> str:
  """The framework's own figure for the table's last column."""
  if "a2q_average_feature_bits" in summary:
    return f"{summary['a2q_average_feature_bits']:.2f} feature bits"
  if "mixq_average_bits" in summary:
    reduction = (
      summary["mixq_bit_operations_fp32"] / summary["mixq_bit_operations"]
    )
    return f"{summary['mixq_average_bits']:.2f} bits, BitOPs / {reduction:.1f}"
  if "dq_protected_fraction" in summary:
    return f"{100 * summary['dq_protected_fraction']:.1f}% protected"
  return ""


def run(config, out, name, reuse):
  workdir = out / name
  if reuse and (workdir / "summary.json").exists():
    return json.loads((workdir / "summary.json").read_text())
  # A run that died part-way continues from its checkpoints.
  resume = any((workdir / "checkpoints").glob("*"))
  summary = lorap_jax.train_and_evaluate(config, workdir, resume=resume)
  summary.pop("states", None)
  return summary


def node_config(dataset, framework, prompt, quick):
  config = lorap_jax.get_config(dataset)
  config.quant.framework = framework
  config.prompt.kind = prompt
  if quick:
    config.seeds, config.train.epochs = 2, 5
    config.mixq.search_epochs = config.mixq.fp32_epochs = 3
    config.mixq.finetune_epochs = 3
  return config


def reddit_config(prompt, folds, epochs):
  config = lorap_jax.get_config("reddit-binary")
  config.quant.framework = "dq"
  config.prompt.kind = prompt
  config.train.learning_rate = 0.001
  config.train.weight_decay = 4e-5
  config.train.epochs = epochs
  config.folds = folds
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="runs/frameworks")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--reuse", action="store_true")
  parser.add_argument("--skip-node", action="store_true")
  parser.add_argument("--skip-graph", action="store_true")
  parser.add_argument("--prompts", default=",".join(PROMPTS))
  parser.add_argument("--graph-folds", type=int, default=10)
  parser.add_argument("--graph-epochs", type=int, default=200)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  prompts = args.prompts.split(",")
  if not args.skip_node:
    print("| framework | prompt | Cora | CiteSeer | framework figures (Cora) |")
    print("|---|---|---|---|---|")
    for framework in FRAMEWORKS:
      for prompt in prompts:
        cora, citeseer = (
          run(
            node_config(dataset, framework, prompt, args.quick),
            out,
            f"{dataset}-{framework}-{prompt}",
            args.reuse,
          )
          for dataset in ("cora", "citeseer")
        )
        print(
          f"| {framework} | {prompt} | {cell(cora)} | {cell(citeseer)} | "
          f"{framework_figure(cora)} |",
          flush=True,
        )
  if not args.skip_graph:
    print("\n| REDDIT-BINARY, GIN, INT4 | accuracy | ms / epoch |")
    print("|---|---|---|")
    for prompt in ("none", "lorap"):
      config = reddit_config(prompt, args.graph_folds, args.graph_epochs)
      if args.quick:
        config.folds, config.train.epochs = 1, 2
      summary = run(config, out, f"reddit-binary-dq-{prompt}", args.reuse)
      print(
        f"| DQ + {prompt} | {cell(summary)} | "
        f"{summary['epoch_time_ms_median']:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
