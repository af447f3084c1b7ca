"""The reproduction script: a tiny table end to end, --reuse, the hooks."""

import csv
import json
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import frameworks_table
import reproduce

import lorap_jax
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train


def _read_csv(path):
  with path.open() as file:
    return list(csv.DictReader(file))


def test_quick_table_rows_anchors_and_reuse(data_dir, tmp_path, capsys):
  out, results = tmp_path / "runs", tmp_path / "results"
  argv = [
    "--datasets=cora",
    "--frameworks=qat",
    "--prompts=none",
    "--seeds=1",
    "--epochs=3",
    f"--out={out}",
    f"--results={results}",
    "--name=tiny",
  ]
  assert reproduce.main(argv) == 0
  # Each cell's programs are dropped after it: kept, a full table's
  # compiled code exhausted the process's memory mappings.
  assert steps_lib.train_step._cache_size() == 0
  rows = _read_csv(results / "tiny.csv")
  assert list(rows[0]) == list(reproduce.CSV_COLUMNS)
  assert rows[0]["code_version"] == train.code_version()
  [qat] = rows
  assert (qat["framework"], qat["prompt"], qat["bits"]) == ("qat", "none", "4")
  assert qat["status"] == "done"
  assert qat["protocol"] == "custom"  # Neither full nor quick settings.
  assert (qat["runs"], qat["epochs_per_run"]) == ("1 run (seeds)", "3")
  assert 10.0 < float(qat["test_acc_mean"]) <= 100.0
  # Cora INT4 plain QAT: MixQ's fixed INT4 log (frameworks.md 4.6).
  assert float(qat["anchor_mean"]) == pytest.approx(79.17)
  assert "frameworks.md 4.6" in qat["anchor_source"]
  markdown = (results / "tiny.md").read_text()
  assert "## cora, GCN" in markdown
  assert "1 seed x 3 epochs" in markdown
  assert "best validation accuracy" in markdown
  # One run: the mean alone (no sample std), in the CSV and the table.
  assert qat["test_acc_std"] == ""
  mean = float(qat["test_acc_mean"])
  assert f"| qat | none | {mean:.1f} |  | 1 run (seeds) |" in markdown
  assert "| 79.2 ± 1.1 |" in markdown

  summary = out / "cora-gcn-qat-none" / "summary.json"
  before = summary.stat().st_mtime_ns
  capsys.readouterr()
  assert reproduce.main([*argv, "--reuse"]) == 0
  assert "cora-gcn-qat-none: reused" in capsys.readouterr().out
  assert summary.stat().st_mtime_ns == before
  assert _read_csv(results / "tiny.csv") == rows
  # A finished run of other settings is kept, never overwritten.
  assert reproduce.main([*argv, "--reuse", "--epochs=4"]) == 0
  assert "kept, another config: train.epochs" in capsys.readouterr().out
  assert summary.stat().st_mtime_ns == before


def test_protocol_labels_and_not_run_cells(tmp_path):
  cell = ("pubmed", "gcn", "dq", "lorap")
  full = reproduce.cell_config(*cell, quick=False)
  assert (full.seeds, full.train.epochs) == (10, 200)
  saved = json.loads(full.to_json_best_effort())
  assert reproduce.protocol_label(saved, *cell) == "full"
  # Another framework's section and the checkpoint cadence do not count.
  saved["mixq"]["search_epochs"] = 7
  saved["checkpoint"]["every"] = 3
  assert reproduce.protocol_label(saved, *cell) == "full"
  quick = reproduce.cell_config(*cell, quick=True).to_json_best_effort()
  quick = json.loads(quick)
  assert reproduce.protocol_label(quick, *cell) == "quick"
  row = reproduce.table_row(tmp_path, cell)
  assert (row["status"], row["test_acc_mean"]) == ("not run", "")
  assert row["anchor_mean"] == ""  # The references state none for it.
  row = reproduce.table_row(tmp_path, ("pubmed", "gcn", "mixq", "none"))
  assert (row["anchor_mean"], row["anchor_std"]) == (77.51, 0.67)


def test_mixq_node_cells_take_mixq_settings():
  # MixQ's own GCN width and weight decay on node tasks; the other
  # frameworks, and MixQ on graph tasks, keep the dataset's config.
  mixq = reproduce.cell_config("cora", "gcn", "mixq", "lorap", quick=False)
  qat = reproduce.cell_config("cora", "gcn", "qat", "lorap", quick=False)
  assert (mixq.model.hidden, mixq.train.weight_decay) == (128, 2e-4)
  assert (qat.model.hidden, qat.train.weight_decay) == (64, 5e-4)
  table = frameworks_table.node_config("cora", "mixq", "none", quick=False)
  assert (table.model.hidden, table.train.weight_decay) == (128, 2e-4)
  graph = reproduce.cell_config("mutag", "gin", "mixq", "none", quick=False)
  base = lorap_jax.get_config("mutag")
  assert graph.model.hidden == base.model.hidden
  assert graph.train.weight_decay == base.train.weight_decay


def test_regression_rows_report_mae(tmp_path):
  """AqSol is in the default table; its rows and section report test MAE."""
  cell = ("aqsol", "gin", "qat", "none")
  assert "aqsol" in reproduce.DATASETS and reproduce.is_regression("aqsol")
  out, results = tmp_path / "runs", tmp_path / "results"
  assert reproduce.table_row(out, cell)["status"] == "not run"
  config = reproduce.cell_config(*cell, quick=False)
  workdir = out / reproduce.cell_name(*cell)
  workdir.mkdir(parents=True)
  summary = {
    "num_runs": 4,
    "test_mae_mean": 1.2345,
    "test_mae_std": 0.05,
    "epoch_time_ms_median": 12.0,
    "config": json.loads(config.to_json_best_effort()),
  }
  (workdir / "summary.json").write_text(json.dumps(summary))
  row = reproduce.table_row(out, cell)
  assert (row["status"], row["protocol"]) == ("done", "full")
  assert (row["test_mae_mean"], row["test_acc_mean"]) == (1.2345, "")
  assert reproduce._result_text(row) == "MAE 1.234 ± 0.050"

  args = ["--datasets=aqsol", "--frameworks=qat", "--prompts=none"]
  common = [f"--out={out}", f"--results={results}", "--table-only"]
  assert reproduce.main([*args, *common]) == 0
  markdown = (results / "full.md").read_text()
  assert "| framework | prompt | test MAE | prompt effect | runs |" in markdown
  assert "| qat | none | MAE 1.234 ± 0.050 |  | 4 runs (seeds) |" in markdown
  assert (
    "- aqsol: GIN 4 x 110, 4 seeds x 100 epochs, the fixed split, Adam lr "
    "0.001 x 0.5 every 25 epochs, weight decay 0.0, l1 loss on standardised "
    "targets, mean readout, test metric at the epoch of lowest validation MAE"
  ) in markdown


def test_plan_and_bad_names(capsys):
  cells = reproduce.plan(("cora", "mutag"), None, ("fp32", "dq"), ("lorap",))
  assert cells == [
    ("cora", "gcn", "fp32", "none"),
    ("cora", "gcn", "dq", "lorap"),
    ("mutag", "gin", "fp32", "none"),
    ("mutag", "gin", "dq", "lorap"),
  ]
  assert reproduce.main(["--datasets=cora,zinc"]) == 2
  assert "--datasets: unknown ['zinc']" in capsys.readouterr().err
  assert reproduce.main(["--datasets=cora", "--models=gin"]) == 2
  assert "--models gin fits none of the datasets" in capsys.readouterr().err
  assert reproduce.main(["--prompts=,"]) == 2
  assert "--prompts: unknown empty list" in capsys.readouterr().err


def _fake_finished_cell(out, cell, accuracy, per_run=None):
  """A cell's workdir with a summary, as a finished full-protocol run
  (listing its runs' test accuracies where `per_run` gives them)."""
  config = reproduce.cell_config(*cell, quick=False)
  workdir = out / reproduce.cell_name(*cell)
  workdir.mkdir(parents=True)
  summary = {
    "num_runs": 10,
    "test_acc_mean": accuracy,
    "test_acc_std": 0.0123,
    "val_acc_mean": 0.8,
    "epoch_time_ms_median": 6.5,
    "config": json.loads(config.to_json_best_effort()),
  }
  if per_run is not None:
    summary["test_accs"] = per_run
  (workdir / "summary.json").write_text(json.dumps(summary))


def test_the_table_keeps_earlier_finished_rows(tmp_path):
  """Filling the table a dataset at a time, from run directories that each
  hold only some cells, keeps what earlier runs finished."""
  results = tmp_path / "results"
  first, second = tmp_path / "first", tmp_path / "second"
  cora = ("cora", "gcn", "qat", "none")
  _fake_finished_cell(first, cora, 0.7531)
  common = [f"--results={results}", "--name=t", "--table-only"]
  cora_args = ["--datasets=cora", "--frameworks=qat", "--prompts=none"]
  assert reproduce.main([*cora_args, f"--out={first}", *common]) == 0
  [row] = _read_csv(results / "t.csv")
  assert (row["status"], row["test_acc_mean"]) == ("done", "75.31")

  # Another dataset from another run directory: the cora row stays, first.
  mutag_args = ["--datasets=mutag", "--frameworks=fp32"]
  assert reproduce.main([*mutag_args, f"--out={second}", *common]) == 0
  rows = _read_csv(results / "t.csv")
  assert [reproduce.cell_of(r) for r in rows] == [
    cora,
    ("mutag", "gin", "fp32", "none"),
  ]
  assert rows[0] == row
  assert rows[1]["status"] == "not run"
  # A cell never run keeps its place in the table too.
  assert reproduce.main([*cora_args, f"--out={first}", *common]) == 0
  assert [r["status"] for r in _read_csv(results / "t.csv")] == [
    "done",
    "not run",
  ]
  markdown = (results / "t.md").read_text()
  assert "| qat | none | 75.3 ± 1.2 |  | 10 runs (seeds) | full |" in markdown
  assert "## mutag, GIN" in markdown
  # The coverage table counts each dataset's cells by protocol or status.
  assert "| dataset | full | not run |" in markdown
  assert "| cora | 1 | 0 |\n| mutag | 0 | 1 |" in markdown

  # The same cell, not found in this run's directory: the earlier row
  # stands; found with a new result: the new row replaces it.
  assert reproduce.main([*cora_args, f"--out={second}", *common]) == 0
  assert _read_csv(results / "t.csv")[0] == row
  _fake_finished_cell(second, cora, 0.8)
  assert reproduce.main([*cora_args, f"--out={second}", *common]) == 0
  assert _read_csv(results / "t.csv")[0]["test_acc_mean"] == "80.0"


def test_a_run_keeps_rows_written_while_its_cells_trained(
  tmp_path, monkeypatch
):
  """Another run's row, written to the same table while this run trained
  a cell, survives this run's next write; a row the user dropped in the
  meantime stays dropped."""
  results = tmp_path / "results"
  mine, other = tmp_path / "mine", tmp_path / "other"
  cora = ("cora", "gcn", "qat", "none")
  mutag, ptc = ("mutag", "gin", "fp32", "none"), ("ptc", "gin", "fp32", "none")
  _fake_finished_cell(other, mutag, 0.9)
  _fake_finished_cell(other, ptc, 0.6)
  common = [f"--results={results}", "--name=t"]
  other_args = ["--frameworks=fp32", f"--out={other}", *common, "--table-only"]
  assert reproduce.main(["--datasets=ptc", *other_args]) == 0

  def train_while_the_table_changes(config, workdir, *, reuse):
    del config, reuse
    assert reproduce.main(["--datasets=mutag", *other_args]) == 0
    kept = [r for r in _read_csv(results / "t.csv") if r["dataset"] != "ptc"]
    with (results / "t.csv").open("w", newline="") as file:
      writer = csv.DictWriter(file, fieldnames=reproduce.CSV_COLUMNS)
      writer.writeheader()
      writer.writerows(kept)
    _fake_finished_cell(mine, cora, 0.75)
    assert workdir == mine / reproduce.cell_name(*cora)
    return "trained"

  monkeypatch.setattr(reproduce, "run_cell", train_while_the_table_changes)
  cora_args = ["--datasets=cora", "--frameworks=qat", "--prompts=none"]
  assert reproduce.main([*cora_args, f"--out={mine}", *common]) == 0
  rows = {reproduce.cell_of(r): r for r in _read_csv(results / "t.csv")}
  assert set(rows) == {cora, mutag}
  assert rows[cora]["test_acc_mean"] == "75.0"
  assert rows[mutag]["test_acc_mean"] == "90.0"
  assert not list(results.glob(".*partial"))


def test_runs_writing_one_table_at_once_keep_each_others_rows(
  tmp_path, monkeypatch
):
  """Two runs that write the same table at the same moment take turns:
  each reads the table after the other wrote it, so both rows stay."""
  results = tmp_path / "results"
  cells = [("mutag", "gin", "fp32", "none"), ("ptc", "gin", "fp32", "none")]
  for cell in cells:
    _fake_finished_cell(tmp_path / "out", cell, 0.7)
  read_table = reproduce.earlier_rows

  def slow_read(results, name):
    rows = read_table(results, name)
    time.sleep(0.3)  # long enough for the other run to read the same table
    return rows

  monkeypatch.setattr(reproduce, "earlier_rows", slow_read)
  codes = []

  def write_table(dataset):
    args = [f"--datasets={dataset}", "--frameworks=fp32", "--table-only"]
    common = [f"--out={tmp_path / 'out'}", f"--results={results}", "--name=t"]
    codes.append(reproduce.main([*args, *common]))

  runs = [threading.Thread(target=write_table, args=(c[0],)) for c in cells]
  for run in runs:
    run.start()
  for run in runs:
    run.join()
  assert codes == [0, 0]
  rows = {reproduce.cell_of(r): r for r in _read_csv(results / "t.csv")}
  assert set(rows) == set(cells)
  assert not list(results.glob(".*partial"))


def test_quick_and_full_tables_default_to_their_own_run_directories(
  tmp_path, monkeypatch
):
  """A full cell in the default directory is not the quick table's row."""
  monkeypatch.chdir(tmp_path)
  cell = ("cora", "gcn", "dq", "gpf-lorap")
  _fake_finished_cell(tmp_path / "runs" / "reproduce", cell, 0.7)
  args = [
    "--datasets=cora",
    "--frameworks=dq",
    "--prompts=gpf-lorap",
    "--results=results",
    "--table-only",
  ]
  assert reproduce.main(args) == 0
  assert reproduce.main(["--quick", *args]) == 0
  [full] = _read_csv(tmp_path / "results" / "full.csv")
  [quick] = _read_csv(tmp_path / "results" / "quick.csv")
  assert (full["status"], full["protocol"]) == ("done", "full")
  assert quick["status"] == "not run"
  assert reproduce.default_run_directory("quick") == "runs/reproduce-quick"


def test_runs_saved_before_a_setting_that_changes_no_result_still_count():
  """The padding ladder and the checkpoint cadence change no result: a cell
  saved without them (or with other values) is the same protocol; a
  changed learning rate is not."""
  wanted = json.loads(
    reproduce.cell_config(
      "mutag", "gin", "qat", "none", quick=False
    ).to_json_best_effort()
  )
  saved = json.loads(json.dumps(wanted))
  del saved["train"]["padding_growth"]
  del saved["first_fold"]  # Saved before the field existed: fold 0 first.
  saved["checkpoint"]["every"] = 3
  same = reproduce.relevant_config(saved) == reproduce.relevant_config(wanted)
  assert same
  saved["train"]["learning_rate"] = 0.5
  assert reproduce.differences(
    reproduce.relevant_config(saved), reproduce.relevant_config(wanted)
  ) == ["train.learning_rate: saved 0.5, wanted 0.01"]


def test_prompt_effect_pairs_runs_and_falls_back_to_means(tmp_path):
  """A prompt's row against its framework alone, run by run where both
  rows list their runs; the difference of the means, marked, where the
  framework's row was saved before the CSV listed them."""
  out, results = tmp_path / "runs", tmp_path / "results"
  alone = [0.70, 0.72, 0.74] + [0.7] * 7
  with_lorap = [0.71, 0.72, 0.76] + [0.69] * 7  # +1, 0, +2, then -1 x 7.
  _fake_finished_cell(out, ("cora", "gcn", "qat", "none"), 0.72, alone)
  _fake_finished_cell(out, ("cora", "gcn", "qat", "lorap"), 0.7, with_lorap)
  _fake_finished_cell(out, ("cora", "gcn", "dq", "none"), 0.75)
  _fake_finished_cell(out, ("cora", "gcn", "dq", "lorap"), 0.7, with_lorap)
  # A2Q: +2 in every run but one, +1 there: p far below 0.05.
  _fake_finished_cell(out, ("cora", "gcn", "a2q", "none"), 0.72, alone)
  ahead = [a + (0.01 if i == 0 else 0.02) for i, a in enumerate(alone)]
  _fake_finished_cell(out, ("cora", "gcn", "a2q", "lorap"), 0.74, ahead)
  args = [
    "--datasets=cora",
    "--frameworks=qat,dq,a2q,mixq",
    "--prompts=none,lorap",
    f"--out={out}",
    f"--results={results}",
    "--table-only",
  ]
  assert reproduce.main(args) == 0
  rows = {reproduce.cell_of(r): r for r in _read_csv(results / "full.csv")}
  assert rows["cora", "gcn", "qat", "lorap"]["test_per_run"].startswith(
    "71.0;72.0;76.0;69.0;"
  )
  markdown = (results / "full.md").read_text()
  differences = np.array([1, 0, 2] + [-1] * 7)
  paired = (
    f"{differences.mean():+.1f} ± {differences.std(ddof=1):.1f} "
    "(2 of 10 better)"
  )
  assert f"| qat | lorap | 70.0 ± 1.2 | {paired} | 10 runs (seeds) |" in (
    markdown
  )
  assert "| qat | none | 72.0 ± 1.2 |  | 10 runs" in markdown
  # Degree-Quant's prompt-free row lists no runs: the means, marked.
  assert "| dq | lorap | 70.0 ± 1.2 | -5.0 (means) |" in markdown
  # MixQ's rows are not run: no effect to state.
  assert "| mixq | lorap | not run |  |" in markdown
  # The glance section: each framework alone, then each prompt's effect
  # per framework, bold where a paired t-test gives p < 0.05.
  glance = markdown[
    markdown.index("## At a glance") : markdown.index("## cora")
  ]
  # FP32 is not among the table's cells: blank.
  alone_row = (
    "| cora, GCN |  | 72.0 ± 1.2 | 75.0 ± 1.2 | 72.0 ± 1.2 | not run |"
  )
  assert alone_row in glance
  a2q = "+1.9 ± 0.3 (10 of 10 better)"
  # A2Q's effect passes Holm's correction over the two tests too (a dagger).
  assert f"| cora, GCN | {paired} | -5.0 (means) | **{a2q}** † |  |" in glance
  assert "1 of 2 run-by-run effects" in glance
  assert (
    "Holm's correction over those 2 tests (family-wise error 0.05): 1."
    in (glance)
  )
  # With two degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2).
  t = 2.0 / (1.0 / np.sqrt(3.0))
  p_value = reproduce.effect_p_value(np.array([1.0, 2.0, 3.0]))
  assert p_value == pytest.approx(1.0 - t / np.sqrt(t**2 + 2.0))
  assert reproduce.effect_p_value(np.zeros(4)) == 1.0


def test_holm_steps_down_and_stops_at_the_first_failure():
  # Thresholds 0.05 / 4, / 3, / 2, / 1 in order of p: the two 0.001 pass,
  # the first 0.04 fails 0.025, and the second, though below 0.05, then
  # fails with it.
  survivors = reproduce.holm_survivors([0.04, 0.001, 0.04, 0.001])
  assert survivors == [False, True, False, True]
  assert reproduce.holm_survivors([0.02, 0.049, 0.001]) == [True, True, True]
  # A p equal to its threshold (0.05 / 2) does not pass.
  assert reproduce.holm_survivors([0.025, 0.5]) == [False, False]
  assert reproduce.holm_survivors([]) == []

  # Regression: lower MAE is better.
  lorap = _mae_row("lorap", [1.4, 1.3, 1.6])
  effect = reproduce.prompt_effect(lorap, _mae_row("none", [1.5, 1.5, 1.5]))
  assert effect == "-0.067 ± 0.153 (2 of 3 better)"  # -0.1, -0.2, +0.1


def _mae_row(prompt, values):
  """A finished regression row of the table, as the CSV holds it."""
  return {
    "status": "done",
    "prompt": prompt,
    "protocol": "full",
    "runs": f"{len(values)} runs (seeds)",
    "test_mae_mean": float(np.mean(values)),
    "test_acc_mean": "",
    "test_per_run": ";".join(map(str, values)),
  }
