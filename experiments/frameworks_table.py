"""Runs the QAT-frameworks tables of README.md and prints them as Markdown.

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/frameworks_table.py --out runs/frameworks
  .venv/bin/python experiments/frameworks_table.py --skip-node \\
      --graph-folds 10 --graph-epochs 200        # the full REDDIT protocol

Node tasks: 2-layer GCN, hidden 64, public split, 10 seeds, INT4 (A2Q
starts at 4 bits and learns them; MixQ searches {2, 4, 8} at its own hidden
128 and weight decay 2e-4), test accuracy at
the best-validation-accuracy epoch, each framework without a prompt, with
LoRAP and with GPF-LoRAP. Graph task: REDDIT-BINARY, GIN 5 x 64, INT4
Degree-Quant with the reference's hyper-parameters (lr 0.001, weight decay
4e-5, p in [0.1, 0.2], 1% percentiles), with and without LoRAP, test
accuracy at the lowest-validation-loss epoch.

The graph rows are run one fold at a time, and each finished fold is
appended to `experiments/results/reddit-binary-dq-<prompt>.folds.csv`: a
10-fold protocol of several hours can be spread over sessions or machines,
the folds already there are not run again, and a row is printed once all
its folds are there. A fold interrupted part-way resumes from its
checkpoints under `--out`. Two processes can share a row's folds with
`--graph-only-folds` (e.g. `0,1,2,3,4` and `5,6,7,8,9`); never give one fold
to two processes, as they would share its run directory.
"""

import argparse
import csv
import hashlib
import json
import pathlib

import numpy as np
from foundation_table import cell

import lorap_jax

RESULTS = pathlib.Path(__file__).parent / "results"

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
  lorap_jax.use_mixq_node_settings(config)
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


FOLD_COLUMNS = (
  "fold",
  "val_acc",
  "test_acc",
  "best_epoch",
  "epoch_time_ms_median",
  "dq_protected_fraction",
  "protocol_digest",
  "device",
  "jax_version",
)


def protocol_digest(config) -> str:
  """A short hash of the config, leaving out which fold and where data is."""
  settings = config.to_dict()
  for name in ("first_fold", "folds", "data_dir"):
    settings.pop(name, None)
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def finished_folds(path: pathlib.Path, digest: str) -> dict[int, dict]:
  """The folds of `path` run with the protocol `digest`, by fold index."""
  if not path.exists():
    return {}
  with path.open(newline="") as file:
    rows = list(csv.DictReader(file))
  return {int(r["fold"]): r for r in rows if r["protocol_digest"] == digest}


def append_fold(path: pathlib.Path, row: dict) -> None:
  """Appends one finished fold (one write, so a kill leaves whole lines)."""
  new = not path.exists()
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=FOLD_COLUMNS)
    if new:
      writer.writeheader()
    writer.writerow(row)


def run_folds(config, out, name, folds_csv, only=None) -> dict | None:
  """Runs the config's folds missing from `folds_csv`, one at a time.

  `only` restricts this call to some of the folds, so that a second process
  can take the last folds of a row while the first works through it (each
  fold has its own run directory; one fold must not run in two processes).
  Returns the summary over all folds (mean and sample std of the test
  accuracy, median of the folds' epoch times), or None while some folds are
  still missing from the CSV.
  """
  digest = protocol_digest(config)
  wanted = range(config.first_fold, config.first_fold + config.folds)
  if only is not None and not set(only) <= set(wanted):
    raise ValueError(f"folds {sorted(only)} are not all in {wanted}")
  for fold in wanted if only is None else sorted(only):
    # Re-read: another process may have finished this fold meanwhile.
    done = finished_folds(folds_csv, digest)
    if fold in done:
      continue
    fold_config = config.copy_and_resolve_references()
    fold_config.first_fold, fold_config.folds = fold, 1
    summary = run(fold_config, out / name, f"fold_{fold}", reuse=False)
    row = {
      "fold": fold,
      "val_acc": summary["val_acc_mean"],
      "test_acc": summary["test_acc_mean"],
      "best_epoch": summary["best_epochs"][0],
      "epoch_time_ms_median": summary["epoch_time_ms_median"] or "",
      "dq_protected_fraction": summary.get("dq_protected_fraction", ""),
      "protocol_digest": digest,
      "device": summary["device"],
      "jax_version": summary["jax_version"],
    }
    append_fold(folds_csv, row)
    print(f"{name} fold {fold}: test {100 * row['test_acc']:.1f}%", flush=True)
  # Another process may have appended folds meanwhile.
  done = finished_folds(folds_csv, digest)
  if any(fold not in done for fold in wanted):
    return None
  rows = [done[fold] for fold in wanted]
  mean, std = lorap_jax.mean_and_std([float(r["test_acc"]) for r in rows])
  # Runs of two epochs or fewer have no steady-state epoch time ("").
  times = [float(t) for r in rows if (t := r["epoch_time_ms_median"]) != ""]
  return {
    "test_acc_mean": mean,
    "test_acc_std": std,
    "epoch_time_ms_median": float(np.median(times)) if times else None,
  }


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
  parser.add_argument(
    "--graph-prompts",
    default="none,lorap",
    help="the REDDIT-BINARY rows to run (two processes can run one each)",
  )
  parser.add_argument(
    "--graph-only-folds",
    help="comma-separated folds for this process to run (default: every "
    "missing fold in order); the row is printed once all are in the CSV",
  )
  parser.add_argument(
    "--fold-results",
    help="folder of the per-fold CSVs (default: experiments/results, or "
    "--out with --quick)",
  )
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
    fold_results = pathlib.Path(
      args.fold_results or (out if args.quick else RESULTS)
    )
    only = args.graph_only_folds
    only = None if only is None else [int(f) for f in only.split(",")]
    for prompt in args.graph_prompts.split(","):
      config = reddit_config(prompt, args.graph_folds, args.graph_epochs)
      if args.quick:
        config.folds, config.train.epochs = 1, 2
      name = f"reddit-binary-dq-{prompt}"
      folds_csv = fold_results / f"{name}.folds.csv"
      summary = run_folds(config, out, name, folds_csv, only)
      if summary is None:
        have = len(finished_folds(folds_csv, protocol_digest(config)))
        print(f"| DQ + {prompt} | {have} of {config.folds} folds so far | |")
        continue
      print(
        f"| DQ + {prompt} | {cell(summary)} | "
        f"{summary['epoch_time_ms_median'] or float('nan'):.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
