"""Beyond the paper: prompts-only training and post-training of prompts.

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/modes_table.py            # full: 10 seeds
  .venv/bin/python experiments/modes_table.py --quick    # 2 seeds, 20 epochs

Protocol: a node task (default Cora), 2-layer GCN, hidden 64, public
split, INT4 plain QAT, Adam lr 0.01 (prompts 1e-3), weight decay 5e-4,
`train.epochs` epochs, LoRAP k = 10, r = 4; test accuracy at the epoch of
best validation accuracy; mean and sample std over seeds. Rows:

- (a) QAT with LoRAP, every parameter trained (the paper's setting).
- (b) prompts only: the INT4 backbone stays at its random initialisation
  and only LoRAP's prompts train (`train.trainable = "prompts"`).
- (c0) QAT without prompts: the source of (c).
- (c) post-training: (c0)'s validation-selected model per seed, frozen
  (weights and quantizer ranges), gets LoRAP prompts trained on
  `train.calibration_size` labelled training nodes (`post_train_prompts`).

Writes `<results>/modes.md` and `.csv` (one row per setting, with the
per-seed accuracies); runs go to `--out`, and a rerun reads back finished
runs unless `--no-reuse`.
"""

import argparse
import csv
import datetime
import json
import pathlib
import sys

import lorap_jax

CSV_COLUMNS = (
  "setting",
  "dataset",
  "seeds",
  "epochs",
  "test_acc_mean",
  "test_acc_std",
  "val_acc_mean",
  "val_acc_std",
  "test_accs",
)


QUICK = {"seeds": 2, "epochs": 20}


def base_config(dataset: str, scale: dict, prompt: str = "lorap"):
  """The dataset's config at INT4 plain QAT; `scale` may set seeds, epochs."""
  config = lorap_jax.get_config(dataset)
  config.quant.framework, config.quant.bits = "qat", 4
  config.prompt.kind = prompt
  if scale.get("seeds"):
    config.seeds = scale["seeds"]
  if scale.get("epochs"):
    config.train.epochs = scale["epochs"]
  return config


def _finished(workdir: pathlib.Path, reuse: bool) -> dict | None:
  path = workdir / "summary.json"
  return json.loads(path.read_text()) if reuse and path.exists() else None


def train(config, workdir: pathlib.Path, reuse: bool) -> dict:
  summary = _finished(workdir, reuse)
  if summary is None:
    resume = any((workdir / "checkpoints").glob("*"))
    summary = lorap_jax.train_and_evaluate(config, workdir, resume=resume)
  return summary


def post_train(source: pathlib.Path, workdir, scale, reuse) -> dict:
  summary = _finished(workdir, reuse)
  if summary is None:
    config = lorap_jax.post_training_config(source)
    config.prompt.kind = "lorap"
    if scale.get("epochs"):
      config.train.epochs = scale["epochs"]
    summary = lorap_jax.post_train_prompts(config, source, workdir)
  return summary


def run_settings(dataset, out: pathlib.Path, scale, reuse) -> dict:
  """The four settings' summaries, by label."""
  full = base_config(dataset, scale)
  prompts_only = base_config(dataset, scale)
  prompts_only.train.trainable = "prompts"
  source = base_config(dataset, scale, prompt="none")
  summaries = {
    "(a) QAT + LoRAP, all parameters trained": train(
      full, out / "a-full", reuse
    ),
    "(b) prompts only, frozen random INT4 backbone": train(
      prompts_only, out / "b-prompts-only", reuse
    ),
    "(c0) QAT without prompts (the source of c)": train(
      source, out / "c0-source", reuse
    ),
  }
  summaries[
    f"(c) post-training LoRAP on (c0), {source.train.calibration_size} "
    "calibration nodes"
  ] = post_train(out / "c0-source", out / "c-post-train", scale, reuse)
  return summaries


def row(label, dataset, summary) -> dict:
  config = summary["config"]
  return {
    "setting": label,
    "dataset": dataset,
    "seeds": summary["num_runs"],
    "epochs": config["train"]["epochs"],
    "test_acc_mean": round(100 * summary["test_acc_mean"], 2),
    "test_acc_std": round(100 * summary["test_acc_std"], 2),
    "val_acc_mean": round(100 * summary["val_acc_mean"], 2),
    "val_acc_std": round(100 * summary["val_acc_std"], 2),
    "test_accs": " ".join(f"{100 * a:.1f}" for a in summary["test_accs"]),
  }


def seed_differences(after: dict, before: dict) -> list[float]:
  """Per-seed test accuracy of `after` minus `before`, in points."""
  return [
    100 * (a - b)
    for a, b in zip(after["test_accs"], before["test_accs"], strict=True)
  ]


def protocol(config) -> str:
  """The settings' shared protocol, read from the config."""
  model, train, prompt = config.model, config.train, config.prompt
  return (
    f"**Protocol**: {config.dataset}, {model.num_layers}-layer "
    f"{model.architecture.upper()}, hidden {model.hidden}, "
    f"INT{config.quant.bits} plain QAT, Adam lr {train.learning_rate} (prompts "
    f"{prompt.learning_rate}), weight decay {train.weight_decay}, LoRAP "
    f"k = {prompt.num_prompts}, r = {prompt.rank}, the epochs below; test "
    "accuracy at the epoch of best validation accuracy, mean ± sample std "
    "over seeds (seed s of (c) starts from seed s of (c0))."
  )


def markdown(rows, differences, config, quick) -> str:
  lines = [
    "# Prompts-only training and post-training of prompts",
    "",
    f"Written by `experiments/modes_table.py` on "
    f"{datetime.date.today().isoformat()}"
    + (" (`--quick`: a smoke run)." if quick else "."),
    "",
    protocol(config),
    "",
    "| setting | seeds | epochs | test % | val % |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['setting']} | {r['seeds']} | {r['epochs']} | "
      f"{r['test_acc_mean']:.1f} ± {r['test_acc_std']:.1f} | "
      f"{r['val_acc_mean']:.1f} ± {r['val_acc_std']:.1f} |"
    )
  mean, spread = lorap_jax.mean_and_std(differences)
  ups = sum(d > 0 for d in differences)
  lines += [
    "",
    f"(c) minus (c0), seed by seed: {mean:+.2f} ± {spread:.2f} test points "
    f"({ups} of {len(differences)} seeds up).",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--dataset", default="cora")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--seeds", type=int, help="override")
  parser.add_argument("--epochs", type=int, help="override")
  parser.add_argument("--out", help="run directory (default: runs/modes)")
  parser.add_argument("--results", default="experiments/results")
  parser.add_argument("--no-reuse", action="store_true")
  args = parser.parse_args(argv)
  lorap_jax.use_compilation_cache()
  if not lorap_jax.is_node_dataset(args.dataset):
    print(
      f"modes_table.py: --dataset {args.dataset} is a graph task; "
      "post-training takes node tasks",
      file=sys.stderr,
    )
    return 2
  out = pathlib.Path(
    args.out or ("runs/modes-quick" if args.quick else "runs/modes")
  )
  scale = dict(QUICK) if args.quick else {}
  if args.seeds:
    scale["seeds"] = args.seeds
  if args.epochs:
    scale["epochs"] = args.epochs
  summaries = run_settings(args.dataset, out, scale, not args.no_reuse)
  rows = [row(label, args.dataset, s) for label, s in summaries.items()]
  *_, source, post = summaries.values()
  differences = seed_differences(post, source)
  results = pathlib.Path(args.results)
  results.mkdir(parents=True, exist_ok=True)
  name = "modes-quick" if args.quick else "modes"
  with (results / f"{name}.csv").open("w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  text = markdown(
    rows, differences, base_config(args.dataset, scale), args.quick
  )
  (results / f"{name}.md").write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
