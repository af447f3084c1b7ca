"""Runs the paper's kind of table and writes it as Markdown and CSV.

The table: dataset x architecture x framework x prompt at INT4, plus an
FP32 row per dataset and architecture. Each cell is one
`lorap_jax.train_and_evaluate` run in `<out>/<dataset>-<arch>-<framework>-
<prompt>/`; the table goes to `<results>/<name>.md` and `.csv`, one row per
cell, with the anchors' published numbers beside ours (`anchors.py`).

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/reproduce.py --quick            # minutes
  .venv/bin/python experiments/reproduce.py --reuse            # full
  .venv/bin/python experiments/reproduce.py --datasets cora,pubmed \\
      --frameworks fp32,qat --prompts none,lorap --reuse
  .venv/bin/python experiments/reproduce.py --table-only       # no training

Full protocol: every dataset's own config (`lorap_jax.get_config`; node
tasks 10 seeds x 200 epochs on their split, graph tasks 10-fold CV with the
config's epochs). `--quick`: 2 seeds (node) or 2 folds x 1 seed (graph), a
few epochs. `--reuse` reads back cells whose summary.json exists (refusing
one whose config differs); a cell interrupted part-way resumes from its
checkpoints either way. Rows say which protocol their run used.

The table accumulates: it keeps every cell of an existing
`<results>/<name>.csv`, and a finished row there stays when this run
neither trains nor finds its cell, so the table can be filled a few
datasets at a time, on several machines, without a run directory that
holds every cell.
"""

import argparse
import contextlib
import csv
import datetime
import fcntl
import json
import os
import pathlib
import platform
import sys

import jax
import numpy as np
import scipy.stats
from anchors import PAPER_VALUES, anchor_for
from frameworks_table import framework_figure

import lorap_jax

QUANT_FRAMEWORKS = ("qat", "dq", "a2q", "mixq")
FRAMEWORKS = ("fp32", *QUANT_FRAMEWORKS)
PROMPTS = ("none", "lorap", "gpf", "gpf-lorap")
# Regression sets report test MAE (lower is better) instead of accuracy.
REGRESSION_DATASETS = ("aqsol",)
# Generated graphs for scaling studies, not benchmarks of the paper's kind.
SYNTHETIC_DATASETS = ("csbm",)
DATASETS = tuple(
  name for name in lorap_jax.DATASET_NAMES if name not in SYNTHETIC_DATASETS
)
# Architectures as the anchors use them: GCN on node tasks (GAT on request,
# `--models gat`), GIN on graph tasks.
NODE_MODELS = ("gcn",)
GRAPH_MODELS = ("gin",)
QUICK = {"node_seeds": 2, "node_epochs": 5, "graph_folds": 2, "graph_epochs": 2}
CSV_COLUMNS = (
  "dataset",
  "model",
  "framework",
  "bits",
  "prompt",
  "status",
  "protocol",
  "runs",
  "epochs_per_run",
  "selection",
  "test_acc_mean",
  "test_acc_std",
  "val_acc_mean",
  "test_mae_mean",
  "test_mae_std",
  "test_per_run",
  "framework_figure",
  "epoch_ms_median",
  "anchor_mean",
  "anchor_std",
  "anchor_source",
  "code_version",
)


# Columns written as numbers (read back as floats to format them again).
NUMERIC_COLUMNS = (
  "test_acc_mean",
  "test_acc_std",
  "val_acc_mean",
  "test_mae_mean",
  "test_mae_std",
  "epoch_ms_median",
  "anchor_mean",
  "anchor_std",
)


def is_regression(dataset: str) -> bool:
  return dataset in REGRESSION_DATASETS


def cell_name(dataset, model, framework, prompt) -> str:
  return f"{dataset}-{model}-{framework}-{prompt}"


def plan(datasets, models, frameworks, prompts) -> list[tuple]:
  """The cells, as (dataset, model, framework, prompt), in table order.

  FP32 has one row per dataset and architecture, without a prompt. A model
  the dataset's task cannot take (GIN on a node task, GCN on graphs) is
  skipped.
  """
  cells = []
  for dataset in datasets:
    node_task = lorap_jax.is_node_dataset(dataset)
    allowed = (*NODE_MODELS, "gat") if node_task else GRAPH_MODELS
    defaults = NODE_MODELS if node_task else GRAPH_MODELS
    for model in models or defaults:
      if model not in allowed:
        continue
      if "fp32" in frameworks:
        cells.append((dataset, model, "fp32", "none"))
      for framework in frameworks:
        if framework == "fp32":
          continue
        for prompt in prompts:
          cells.append((dataset, model, framework, prompt))
  return cells


def cell_config(dataset, model, framework, prompt, *, quick, overrides=None):
  """The config of one cell: the dataset's own (full protocol) or quick."""
  config = lorap_jax.get_config(dataset)
  config.model.architecture = model
  config.quant.framework = framework
  config.prompt.kind = prompt
  lorap_jax.use_mixq_node_settings(config)  # Node tasks only, MixQ only.
  node_task = lorap_jax.is_node_dataset(dataset)
  if quick:
    # Minutes-scale cells restart rather than resume; checkpoint writes
    # would cost more than the few epochs they protect.
    config.checkpoint.enabled = False
    # A few epochs are compile-bound: the three coarse padding sizes compile
    # a third as many shapes as the ladder (a PROTEINS cell 18 s, not 42 s).
    config.train.padding_growth = 0.0
    if node_task:
      config.seeds = QUICK["node_seeds"]
      config.train.epochs = QUICK["node_epochs"]
      config.mixq.search_epochs = config.mixq.fp32_epochs = 2
      config.mixq.finetune_epochs = 2
    else:
      config.seeds = 1
      config.folds = min(config.folds, QUICK["graph_folds"])
      config.train.epochs = QUICK["graph_epochs"]
  for key, value in (overrides or {}).items():
    if value is None:
      continue
    if key == "epochs":
      config.train.epochs = value
      if node_task:
        config.mixq.search_epochs = config.mixq.fp32_epochs = value
        config.mixq.finetune_epochs = value
    elif key == ("seeds" if node_task else "folds"):
      config[key] = value
  return config


def relevant_config(config: dict) -> dict:
  """The config fields a cell's results depend on.

  Leaves out the data directory, the checkpoint cadence, the batches'
  padding (`train.padding_growth`: the same sums, other random streams),
  and the settings of the frameworks the cell does not use, so runs saved
  before a field was added to another framework's section still count as
  the same protocol. A run saved before `first_fold` existed started at
  fold 0.
  """
  unused = {"dq", "a2q", "mixq"} - {config["quant"]["framework"]}
  relevant = {
    key: value
    for key, value in config.items()
    if key not in unused | {"data_dir", "checkpoint"}
  }
  relevant.setdefault("first_fold", 0)
  relevant["train"] = {
    key: value
    for key, value in relevant.get("train", {}).items()
    if key != "padding_growth"
  }
  return relevant


def differences(saved: dict, wanted: dict, prefix="") -> list[str]:
  found = []
  for key in sorted(set(saved) | set(wanted)):
    old, new = saved.get(key), wanted.get(key)
    if old == new:
      continue
    if isinstance(old, dict) and isinstance(new, dict):
      found += differences(old, new, f"{prefix}{key}.")
    else:
      found.append(f"{prefix}{key}: saved {old!r}, wanted {new!r}")
  return found


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def default_run_directory(table_name: str) -> str:
  """Each table's cells in their own directory: a cell of the quick table
  and the same cell of the full one share a name, and in one directory the
  second would find the first (a finished run of another config) and be
  kept out of its table."""
  if table_name == "full":
    return "runs/reproduce"
  return f"runs/reproduce-{table_name}"


def run_cell(config, workdir: pathlib.Path, *, reuse: bool) -> str:
  """Trains one cell unless --reuse finds it done; returns its status.

  Refused settings and diverging runs are recorded in `error.txt` and
  reported as the cell's status, so one cell cannot stop the table.
  """
  summary_path = workdir / "summary.json"
  if reuse and summary_path.exists():
    saved = json.loads(summary_path.read_text())["config"]
    found = differences(
      relevant_config(saved), relevant_config(_config_dict(config))
    )
    if found:
      # Never overwrite a finished run; its row says which protocol it is.
      return "kept, another config: " + "; ".join(found[:4])
    return "reused"
  (workdir / "error.txt").unlink(missing_ok=True)
  # A run that died part-way continues from its checkpoints.
  resume = any((workdir / "checkpoints").glob("*"))
  try:
    lorap_jax.train_and_evaluate(config, workdir, resume=resume)
  except (ValueError, FloatingPointError) as error:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
    return "failed"
  finally:
    # Each cell compiles its own programs, which the next cell never
    # reuses; kept, their code mappings reached the kernel's 65,530 limit
    # after about 40 quick cells and LLVM aborted the process.
    jax.clear_caches()
  return "trained"


def protocol_label(saved_config: dict, dataset, model, framework, prompt):
  """'full' or 'quick' where the run used that protocol, else 'custom'."""
  saved = relevant_config(saved_config)
  for label, quick in (("full", False), ("quick", True)):
    wanted = cell_config(dataset, model, framework, prompt, quick=quick)
    if saved == relevant_config(_config_dict(wanted)):
      return label
  return "custom"


def _count(count: int, noun: str) -> str:
  """'1 seed', '10 seeds'."""
  return f"{count} {noun}{'' if count == 1 else 's'}"


def _runs_text(count: int, runs_of: str) -> str:
  return f"{_count(count, 'run')} ({runs_of})"


def cell_figure(summary: dict) -> str:
  """The framework's own figure; graph-task MixQ has no BitOPs count."""
  if "mixq_average_bits" in summary and "mixq_bit_operations" not in summary:
    return f"{summary['mixq_average_bits']:.2f} bits"
  return framework_figure(summary)


def _epochs_per_run(config: dict, node_task: bool) -> int:
  """Epochs one run trained, over all of its framework's stages."""
  if config["quant"]["framework"] != "mixq":
    return config["train"]["epochs"]
  if node_task:
    stages = ("search_epochs", "fp32_epochs", "finetune_epochs")
    return sum(config["mixq"][stage] for stage in stages)
  return 2 * config["train"]["epochs"]  # Search, then QAT from scratch.


def _selection_rule(selection: str) -> str:
  return {
    "val_acc": "best validation accuracy (earliest epoch on ties)",
    "val_loss": "lowest validation loss",
    "val_mae": "lowest validation MAE",
  }.get(selection, selection)


def _decay_text(train) -> str:
  if not train.lr_decay_every:
    return ""
  return f" x {train.lr_decay_factor} every {train.lr_decay_every} epochs"


def _regression_text(config) -> str:
  standardised = config.train.standardize_targets
  return (
    f"{config.train.regression_loss} loss on "
    f"{'standardised' if standardised else 'raw'} targets, "
    f"{config.model.readout} readout, "
  )


def _percent(value):
  return None if value is None else round(100 * value, 2)


def _per_run_text(values, scale: float, digits: int) -> str:
  """Each run's test metric in run order (folds, then seeds), joined by
  ';', so that prompts can be compared with their framework run by run
  without the run directories."""
  if not values:  # Summaries written before they listed their runs.
    return ""
  return ";".join(str(round(scale * value, digits)) for value in values)


def table_row(out: pathlib.Path, cell) -> dict:
  """One CSV / Markdown row from a cell's workdir (numbers in percent)."""
  dataset, model, framework, prompt = cell
  workdir = out / cell_name(*cell)
  anchor = anchor_for(dataset, model, framework, prompt)
  row = dict.fromkeys(CSV_COLUMNS, "")
  row.update(
    dataset=dataset,
    model=model,
    framework=framework,
    bits="32" if framework == "fp32" else "4",
    prompt=prompt,
    status="not run",
  )
  if anchor is not None:
    source = anchor.source + (f"; {anchor.note}" if anchor.note else "")
    row.update(
      anchor_mean=anchor.mean, anchor_std=anchor.std, anchor_source=source
    )
  summary_path = workdir / "summary.json"
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    config = summary["config"]
    node_task = lorap_jax.is_node_dataset(dataset)
    row.update(
      status="done",
      protocol=protocol_label(config, *cell),
      runs=_runs_text(summary["num_runs"], lorap_jax.runs_of(config)),
      epochs_per_run=_epochs_per_run(config, node_task),
      selection=config["train"]["selection"],
      framework_figure=cell_figure(summary),
      code_version=summary.get("code_version", ""),
      epoch_ms_median=(
        ""
        if summary.get("epoch_time_ms_median") is None
        else round(summary["epoch_time_ms_median"], 1)
      ),
    )
    if "test_mae_mean" in summary:
      row.update(
        test_mae_mean=round(summary["test_mae_mean"], 4),
        test_mae_std=round(summary["test_mae_std"], 4),
        test_per_run=_per_run_text(summary.get("test_maes"), 1, 4),
      )
    else:
      row.update(
        test_acc_mean=_percent(summary["test_acc_mean"]),
        test_acc_std=_percent(summary["test_acc_std"]),
        val_acc_mean=_percent(summary["val_acc_mean"]),
        test_per_run=_per_run_text(summary.get("test_accs"), 100, 2),
      )
    if summary["num_runs"] < 2:  # One run has no sample std: leave it empty.
      row.update(test_acc_std="", test_mae_std="")
  elif (workdir / "error.txt").exists():
    message = (workdir / "error.txt").read_text().strip().splitlines()[0]
    row.update(status=f"failed: {message}")
  elif any((workdir / "checkpoints").glob("*")):
    row.update(status="interrupted: --reuse resumes it from checkpoints")
  return row


def _mixq_stages(quick, overrides) -> str:
  config = cell_config(
    "cora", "gcn", "mixq", "none", quick=quick, **{"overrides": overrides}
  )
  stages = config.mixq
  return (
    f"{stages.search_epochs} + {stages.fp32_epochs} + {stages.finetune_epochs}"
  )


def _protocol_lines(cells, quick: bool, overrides) -> list[str]:
  """The protocol of the table's datasets, read from their configs."""
  lines = []
  seen = set()
  for dataset, model, *_ in cells:
    if (dataset, model) in seen:
      continue
    seen.add((dataset, model))
    config = cell_config(
      dataset, model, "qat", "none", quick=quick, overrides=overrides
    )
    if lorap_jax.is_node_dataset(dataset):
      runs = _count(config.seeds, "seed")
      split = (
        "random per-class split redrawn per seed"
        if dataset.startswith("amazon")
        else "public split"
      )
    else:
      runs = f"{_count(config.folds, 'fold')} x {_count(config.seeds, 'seed')}"
      split = (
        "seeded stratified CV folds"
        if dataset.startswith("tu-")
        else "the GIN-format CV folds"
      ) + " (validation fold = the previous test fold)"
      if config.folds == 1:
        runs, split = _count(config.seeds, "seed"), "the fixed split"
    model_text = (
      f"{model.upper()} {config.model.num_layers} x {config.model.hidden}"
    )
    lines.append(
      f"- {dataset}: {model_text}, {runs} x {config.train.epochs} epochs, "
      f"{split}, Adam lr {config.train.learning_rate}"
      f"{_decay_text(config.train)}, weight decay "
      f"{config.train.weight_decay}, "
      + (_regression_text(config) if is_regression(dataset) else "")
      + f"test metric at the epoch of {_selection_rule(config.train.selection)}"
    )
  return lines


def cell_of(row: dict) -> tuple:
  return (row["dataset"], row["model"], row["framework"], row["prompt"])


def earlier_rows(results: pathlib.Path, name: str) -> dict[tuple, dict]:
  """The rows of an existing `<results>/<name>.csv`, by cell."""
  path = results / f"{name}.csv"
  if not path.exists():
    return {}
  with path.open(newline="") as file:
    rows = list(csv.DictReader(file))
  return {
    cell_of(row): {
      key: float(value) if key in NUMERIC_COLUMNS and value != "" else value
      for key, value in row.items()
    }
    for row in rows
  }


def table_order(cell) -> tuple:
  """Where a cell goes in the table: `plan`'s order, over every dataset."""
  dataset, model, framework, prompt = cell
  return (
    DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS),
    ("gcn", "gat", "gin").index(model),
    (framework != "fp32", FRAMEWORKS.index(framework)),
    PROMPTS.index(prompt),
  )


def merged_rows(fresh: dict, earlier: dict, out: pathlib.Path):
  """The table's cells and rows, in table order: every cell of the earlier
  table and of this run. A cell's row is what `out` holds for it, unless
  that is no result (not run, interrupted) and the earlier table has a
  finished row for it."""
  cells = sorted(set(earlier) | set(fresh), key=table_order)
  rows = []
  for cell in cells:
    row = fresh[cell] if cell in fresh else table_row(out, cell)
    kept = earlier.get(cell)
    finished = row["status"].startswith(("done", "failed"))
    if kept is not None and kept["status"] == "done" and not finished:
      row = kept
    rows.append(row)
  return cells, rows


@contextlib.contextmanager
def table_lock(results: pathlib.Path, name: str):
  """Holds `<results>/.<name>.lock`: runs that share a table take turns to
  read, merge and write it, so none drops a row another just wrote."""
  results.mkdir(parents=True, exist_ok=True)
  with (results / f".{name}.lock").open("w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def write_tables(rows, cells, results: pathlib.Path, name, quick, overrides):
  """Writes `<results>/<name>.csv` and `.md`."""
  results.mkdir(parents=True, exist_ok=True)
  partial = results / f".{name}.csv.{os.getpid()}.partial"
  with partial.open("w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  # A concurrent run never reads a half-written table.
  partial.replace(results / f"{name}.csv")
  counts = {}
  for row in rows:
    key = _coverage_key(row)
    counts[key] = counts.get(key, 0) + 1
  keys = sorted(counts, key=_coverage_order)
  device = jax.devices()[0]
  mixq_node = lorap_jax.MIXQ_NODE_SETTINGS
  lines = [
    f"# Reproduction table: {name}",
    "",
    f"Written by `experiments/reproduce.py` on "
    f"{datetime.date.today().isoformat()}. Machine: {platform.machine()} "
    f"CPU, {_cpu_count()} cores, JAX {jax.__version__} on "
    f"{device.platform} ({device.device_kind}). Finished rows of earlier "
    "runs of the script (other days or machines) are kept where this run "
    "did not train their cell.",
    "",
    "**Protocol** ("
    + (
      "`--quick`: a smoke run, not comparable with the published numbers"
      if quick
      else "full: each dataset's own config"
    )
    + "):",
    "",
    *_protocol_lines(cells, quick, overrides),
    "",
    "INT4: plain QAT and Degree-Quant at 4 bits everywhere; A2Q starts at 4 "
    "bits and learns feature widths under a 4-bit average; MixQ searches "
    "{2, 4, 8} per component and reports the widths it kept (the figures "
    f"column); on node tasks its run is {_mixq_stages(quick, overrides)} "
    "epochs (search, FP32, quantized fine-tune) with MixQ's own GCN width "
    f"{mixq_node['model.hidden']} and weight decay "
    f"{mixq_node['train.weight_decay']}, on graph tasks a search "
    "then QAT from scratch, each as long as the other frameworks' run. "
    "LoRAP k = 10, r = 4 after every aggregation; GPF one input "
    "prompt; GPF-LoRAP GPF-plus (k = 10) on the input plus LoRAP. "
    "Accuracy in percent (regression sets: test MAE, lower is better), "
    "mean ± sample std (ddof 1) over the runs. "
    "`prompt effect`: the prompt's row minus its framework's row without a "
    "prompt, run by run (same folds and seeds), as mean ± std of the "
    "differences and the runs it improved; `(means)` where a row saved "
    "before the CSV listed its runs (`test_per_run`) allows only the "
    "difference of the means. "
    "`protocol` says which protocol each cell's saved run used (`full`, "
    "`quick`, or `custom` for other settings); `not run` cells have no "
    "result yet. The CSV's `code_version` names the library commit each "
    "cell's run used (empty for runs saved before it was recorded).",
    "",
    "Anchors: published numbers under the anchor's own protocol "
    "(`experiments/anchors.py`, with the section of the reference notes "
    "each comes from); empty where the references state none.",
    "",
    "Cells: " + ", ".join(f"{counts[k]} {k}" for k in keys) + ".",
    "",
    *_coverage_lines(rows, keys),
    "",
    *_glance_lines(rows),
  ]
  by_table = {}
  for row in rows:
    by_table.setdefault((row["dataset"], row["model"]), []).append(row)
  for (dataset, model), table in by_table.items():
    lines += ["", f"## {dataset}, {model.upper()}", ""]
    if dataset in PAPER_VALUES:
      lines += [
        f"LoRAP paper value (third-party extraction; framework, bits and "
        f"architecture not stated, `lorap.md` 6): {PAPER_VALUES[dataset]}.",
        "",
      ]
    metric = "test MAE" if is_regression(dataset) else "test %"
    lines += [
      f"| framework | prompt | {metric} | prompt effect | runs | protocol "
      "| framework figure | anchor % | anchor source |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    alone = {row["framework"]: row for row in table if row["prompt"] == "none"}
    for row in table:
      effect = prompt_effect(row, alone.get(row["framework"]))
      lines.append(
        f"| {row['framework']} | {row['prompt']} | {_result_text(row)} | "
        f"{effect} | {row['runs']} | {row['protocol']} | "
        f"{row['framework_figure']} | {_anchor_text(row)} | "
        f"{row['anchor_source']} |"
      )
  (results / f"{name}.md").write_text("\n".join(lines) + "\n")


def _per_run_values(row) -> list[float]:
  text = row.get("test_per_run", "")  # Absent from tables before it was.
  return [float(value) for value in text.split(";")] if text else []


def paired_differences(row, alone) -> np.ndarray | None:
  """`row`'s test metric minus its framework alone's (`alone`), run by
  run, where both are finished and list the same runs; else None."""
  if alone is None or not row["status"] == alone["status"] == "done":
    return None
  ours, theirs = _per_run_values(row), _per_run_values(alone)
  paired = len(ours) == len(theirs) > 1 and (row["protocol"], row["runs"]) == (
    alone["protocol"],
    alone["runs"],
  )
  return np.subtract(ours, theirs) if paired else None


def _is_regression_row(row) -> bool:
  return row["test_mae_mean"] != ""


def _effect_text(row, differences) -> str:
  """'mean ± std (k of n better)': higher accuracy or lower MAE."""
  regression = _is_regression_row(row)
  digits = 3 if regression else 1
  better = np.sum(differences < 0 if regression else differences > 0)
  return (
    f"{differences.mean():+.{digits}f} ± "
    f"{differences.std(ddof=1):.{digits}f} "
    f"({better} of {len(differences)} better)"
  )


def prompt_effect(row, alone) -> str:
  """A prompt's row against its framework alone (`alone`, the same
  dataset's prompt-free row): the test metric's difference run by run,
  mean ± std and how many runs it improved (higher accuracy, lower MAE),
  where both rows list the same runs; else the difference of the means,
  marked so. Empty for prompt-free rows and unfinished pairs."""
  if row["prompt"] == "none" or alone is None:
    return ""
  if not row["status"] == alone["status"] == "done":
    return ""
  differences = paired_differences(row, alone)
  if differences is not None:
    return _effect_text(row, differences)
  regression = _is_regression_row(row)
  metric = "test_mae_mean" if regression else "test_acc_mean"
  return f"{row[metric] - alone[metric]:+.{3 if regression else 1}f} (means)"


# A prompt's effect is marked where a paired t-test (two-sided, runs as
# pairs) gives p below this, uncorrected for the table's many comparisons
# (bold), and again where it passes Holm's correction for them (a dagger).
MARKED_P = 0.05


def effect_p_value(differences) -> float:
  """Two-sided paired t-test p of run-by-run differences. Where they are
  all equal the t statistic is undefined: 1.0 if they are all zero, else
  0.0 (the same change in every run)."""
  if np.all(differences == differences[0]):
    return 1.0 if differences[0] == 0 else 0.0
  return float(scipy.stats.ttest_1samp(differences, 0.0).pvalue)


def _glance_lines(rows) -> list[str]:
  """Every dataset's frameworks without a prompt, then each prompt's
  effect, as dataset x framework tables, so where a prompt helps shows on
  one screen."""
  tables = {}
  for row in rows:
    table = tables.setdefault(f"{row['dataset']}, {row['model'].upper()}", {})
    table[row["framework"], row["prompt"]] = row
  finished = {
    name: cells
    for name, cells in tables.items()
    if any(row["status"] == "done" for row in cells.values())
  }
  lines = [
    "## At a glance",
    "",
    "Without a prompt (test %; regression sets: test MAE):",
    "",
    "| dataset | " + " | ".join(FRAMEWORKS) + " |",
    "|---|" + "---|" * len(FRAMEWORKS),
  ]
  for name, cells in finished.items():
    results = [
      _result_text(cells[f, "none"]) if (f, "none") in cells else ""
      for f in FRAMEWORKS
    ]
    lines.append(f"| {name} | " + " | ".join(results) + " |")
  effects = {
    (prompt, name, framework): _glance_effect(cells, framework, prompt)
    for prompt in PROMPTS[1:]
    for name, cells in finished.items()
    for framework in QUANT_FRAMEWORKS
  }
  tested = [key for key, (_, p_value) in effects.items() if p_value is not None]
  p_values = [effects[key][1] for key in tested]
  corrected = {
    key
    for key, survives in zip(tested, holm_survivors(p_values), strict=True)
    if survives
  }
  for prompt in PROMPTS[1:]:
    lines += [
      "",
      f"`{prompt}` against its framework alone (`prompt effect` as in the "
      "tables below: points of test accuracy; regression sets: test MAE, "
      "lower is better):",
      "",
      "| dataset | " + " | ".join(QUANT_FRAMEWORKS) + " |",
      "|---|" + "---|" * len(QUANT_FRAMEWORKS),
    ]
    for name in finished:
      texts = []
      for framework in QUANT_FRAMEWORKS:
        key = (prompt, name, framework)
        text, p_value = effects[key]
        if p_value is not None and p_value < MARKED_P:
          text = f"**{text}**"
        texts.append(text + (" †" if key in corrected else ""))
      lines.append(f"| {name} | " + " | ".join(texts) + " |")
  marked = sum(p < MARKED_P for p in p_values)
  lines += [
    "",
    f"Bold: a paired t-test over the runs gives p < {MARKED_P} "
    f"(two-sided, uncorrected): {marked} of {len(p_values)} run-by-run "
    f"effects, against about {MARKED_P * len(p_values):.0f} that chance "
    "alone would mark if no prompt did anything. †: significant still after "
    f"Holm's correction over those {len(p_values)} tests (family-wise error "
    f"{MARKED_P}): {len(corrected)}.",
  ]
  return lines


def holm_survivors(p_values, alpha: float = MARKED_P) -> list[bool]:
  """Holm's step-down procedure: which of the tests stay significant with
  the chance of any false one held at `alpha`. The k-th smallest p (from
  0) must be below alpha / (m - k), and every smaller one must pass too."""
  survives = [False] * len(p_values)
  for rank, index in enumerate(np.argsort(p_values, kind="stable")):
    if not p_values[index] < alpha / (len(p_values) - rank):
      break
    survives[index] = True
  return survives


def _glance_effect(cells, framework, prompt) -> tuple[str, float | None]:
  """A prompt's effect under `framework` and its paired t-test p (None
  where the runs cannot be paired)."""
  row = cells.get((framework, prompt))
  if row is None:
    return "", None
  alone = cells.get((framework, "none"))
  differences = paired_differences(row, alone)
  p_value = None if differences is None else effect_p_value(differences)
  return prompt_effect(row, alone), p_value


def _coverage_key(row) -> str:
  """A row's column in the coverage count: its protocol, else its status."""
  return row["protocol"] or row["status"].split(":")[0]


def _coverage_order(key: str) -> tuple:
  """Results first (full, quick, custom), then the cells without one."""
  labels = ("full", "quick", "custom")
  return (labels.index(key), "") if key in labels else (len(labels), key)


def _coverage_lines(rows, keys) -> list[str]:
  """A table of each dataset's cells by protocol or status, so the
  table's state shows at a glance before its per-dataset sections."""
  by_dataset = {}
  for row in rows:
    counts = by_dataset.setdefault(row["dataset"], dict.fromkeys(keys, 0))
    counts[_coverage_key(row)] += 1
  lines = [
    "| dataset | " + " | ".join(keys) + " |",
    "|---|" + "---|" * len(keys),
  ]
  for dataset, counts in by_dataset.items():
    lines.append(
      f"| {dataset} | " + " | ".join(str(counts[k]) for k in keys) + " |"
    )
  return lines


def _cpu_count() -> int:
  return os.cpu_count() or 0


def _result_text(row) -> str:
  if _is_regression_row(row):
    return "MAE " + _mean_std(row["test_mae_mean"], row["test_mae_std"], 3)
  if row["test_acc_mean"] != "":
    return _mean_std(row["test_acc_mean"], row["test_acc_std"], 1)
  return row["status"]


def _mean_std(mean, std, digits: int) -> str:
  """'mean ± std', or the mean alone where there is no std (one run)."""
  if std == "":
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _anchor_text(row) -> str:
  if row["anchor_mean"] == "":
    return ""
  return f"{row['anchor_mean']:.1f} ± {row['anchor_std']:.1f}"


def _names(text: str | None, known: tuple, what: str) -> tuple | None:
  if text is None:
    return None
  names = tuple(name.strip() for name in text.split(",") if name.strip())
  unknown = [name for name in names if name not in known]
  if unknown or not names:
    raise ValueError(
      f"--{what}: unknown {unknown or 'empty list'}; choose from "
      + ", ".join(known)
    )
  return names


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument("--datasets", help="comma list (default: all)")
  parser.add_argument("--models", help="comma list of gcn, gat, gin")
  parser.add_argument("--frameworks", help=",".join(FRAMEWORKS))
  parser.add_argument("--prompts", help=",".join(PROMPTS))
  parser.add_argument(
    "--out",
    help="run directory (default: runs/reproduce for the full table, "
    "runs/reproduce-<name> for another, such as quick)",
  )
  parser.add_argument("--results", default="experiments/results")
  parser.add_argument("--name", help="table file name (quick or full)")
  parser.add_argument("--reuse", action="store_true")
  parser.add_argument(
    "--table-only",
    action="store_true",
    help="write the table from what --out holds, training nothing",
  )
  parser.add_argument("--seeds", type=int, help="node tasks: override")
  parser.add_argument("--folds", type=int, help="graph tasks: override")
  parser.add_argument("--epochs", type=int, help="override (MixQ: per stage)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  lorap_jax.use_compilation_cache()  # Resumed cells skip compiling.
  try:
    datasets = _names(args.datasets, DATASETS, "datasets")
    models = _names(args.models, ("gcn", "gat", "gin"), "models")
    frameworks = _names(args.frameworks, FRAMEWORKS, "frameworks")
    prompts = _names(args.prompts, PROMPTS, "prompts")
  except ValueError as error:
    print(f"reproduce.py: {error}", file=sys.stderr)
    return 2
  cells = plan(
    datasets or DATASETS, models, frameworks or FRAMEWORKS, prompts or PROMPTS
  )
  if not cells:
    print(
      f"reproduce.py: --models {args.models} fits none of the datasets "
      "(node tasks: gcn, gat; graph tasks: gin)",
      file=sys.stderr,
    )
    return 2
  name = args.name or ("quick" if args.quick else "full")
  out = pathlib.Path(args.out or default_run_directory(name))
  results = pathlib.Path(args.results)
  overrides = {"seeds": args.seeds, "folds": args.folds, "epochs": args.epochs}
  fresh = {cell: table_row(out, cell) for cell in cells}

  def write():
    # Read again at every write: rows another process wrote (another run
    # directory) or the user dropped since this run began stay as they are.
    with table_lock(results, name):
      earlier = earlier_rows(results, name)
      table_cells, rows = merged_rows(fresh, earlier, out)
      write_tables(rows, table_cells, results, name, args.quick, overrides)

  write()
  if args.table_only:
    return 0
  for cell in cells:
    config = cell_config(*cell, quick=args.quick, overrides=overrides)
    status = run_cell(config, out / cell_name(*cell), reuse=args.reuse)
    print(f"{cell_name(*cell)}: {status}", flush=True)
    fresh[cell] = table_row(out, cell)
    # Rewritten after every cell, so an interrupted run leaves a table.
    write()
  return 0


if __name__ == "__main__":
  sys.exit(main())
