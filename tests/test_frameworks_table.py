"""frameworks_table.py's fold-by-fold graph rows, kept across sessions."""

import csv
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import frameworks_table

import lorap_jax


def _mutag_config(data_dir, epochs=2):
  config = lorap_jax.get_config("mutag")
  config.data_dir = str(data_dir)
  config.quant.framework = "qat"
  config.folds, config.train.epochs = 2, epochs
  # The CSV's bookkeeping is under test, not accuracy: a small model in one
  # batch per epoch compiles fast.
  config.model.num_layers, config.model.hidden = 2, 16
  config.train.batch_size = 256
  return config


def test_folds_accumulate_in_the_csv_and_are_not_rerun(
  data_dir, tmp_path, monkeypatch
):
  folds_csv = tmp_path / "results" / "mutag.folds.csv"
  config = _mutag_config(data_dir)
  summary = frameworks_table.run_folds(
    config, tmp_path / "runs", "m", folds_csv
  )
  with folds_csv.open(newline="") as file:
    rows = list(csv.DictReader(file))
  assert [int(r["fold"]) for r in rows] == [0, 1]
  accuracies = [float(r["test_acc"]) for r in rows]
  assert summary["test_acc_mean"] == pytest.approx(np.mean(accuracies))
  assert summary["test_acc_std"] == pytest.approx(np.std(accuracies, ddof=1))

  def no_training(*args, **kwargs):
    raise AssertionError("a finished fold was trained again")

  # A later session, without the run directory: the CSV is enough.
  monkeypatch.setattr(lorap_jax, "train_and_evaluate", no_training)
  again = frameworks_table.run_folds(config, tmp_path / "gone", "m", folds_csv)
  assert again == summary

  # Another protocol does not reuse those folds.
  with pytest.raises(AssertionError, match="trained again"):
    frameworks_table.run_folds(
      _mutag_config(data_dir, epochs=3), tmp_path / "gone", "m", folds_csv
    )


def test_the_protocol_digest_ignores_only_where_and_which_fold(data_dir):
  config = _mutag_config(data_dir)
  moved = config.copy_and_resolve_references()
  moved.data_dir, moved.first_fold, moved.folds = "/elsewhere", 3, 1
  digest = frameworks_table.protocol_digest(config)
  assert frameworks_table.protocol_digest(moved) == digest
  moved.train.learning_rate *= 2
  assert frameworks_table.protocol_digest(moved) != digest


def test_a_second_process_can_take_some_folds_of_a_row(data_dir, tmp_path):
  folds_csv = tmp_path / "results" / "mutag.folds.csv"
  config = _mutag_config(data_dir)
  runs = tmp_path / "runs"
  # The last fold alone: no row yet, but its result is kept.
  digest = frameworks_table.protocol_digest(config)
  assert frameworks_table.run_folds(config, runs, "m", folds_csv, [1]) is None
  assert list(frameworks_table.finished_folds(folds_csv, digest)) == [1]
  summary = frameworks_table.run_folds(config, runs, "m", folds_csv, [0])
  done = frameworks_table.finished_folds(folds_csv, digest)
  assert sorted(done) == [0, 1]
  accuracies = [float(done[fold]["test_acc"]) for fold in (0, 1)]
  assert summary["test_acc_mean"] == pytest.approx(np.mean(accuracies))

  with pytest.raises(ValueError, match=r"folds \[2\] are not all in"):
    frameworks_table.run_folds(config, runs, "m", folds_csv, [2])
