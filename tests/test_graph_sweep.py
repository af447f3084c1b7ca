"""Sweeps over graph datasets: batches gathered on the device, folds, the
one-run path against `train_and_evaluate`, vmapped runs, the CLI."""

import csv
import dataclasses
import json

import jax
import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import cli, graph_sweep
from lorap_jax._src import data as data_lib
from lorap_jax._src import sweep as sweep_lib
from lorap_jax._src.data import batching
from lorap_jax._src.data import device_batching as device_lib


@pytest.fixture(scope="module")
def mutag(data_dir):
  return data_lib.load_dataset("mutag", data_dir)


def _config(data_dir, *, epochs, folds=1, framework="qat"):
  config = lorap_jax.get_config("mutag")
  config.data_dir = str(data_dir)
  config.train.epochs = epochs
  config.folds = folds
  config.quant.framework = framework
  config.checkpoint.enabled = False
  config.seeds = 1
  # Two layers rather than five: a sweep compiles a whole run (initial
  # state, steps, evaluation) into one program, and these test its plumbing.
  config.model.num_layers, config.model.hidden = 2, 32
  return config


# ---------------------------------------------------------------------------
# Batches gathered inside a program.
# ---------------------------------------------------------------------------


def test_gathered_batches_equal_the_host_batches(mutag):
  # A full batch, a short last one (ids padded with NO_GRAPH), at the
  # host's largest budget: every array equal, dtypes included.
  order = np.random.default_rng(0).permutation(len(mutag.graphs))[:45]
  rows = device_lib.id_rows(order, 16)
  assert rows.shape == (3, 16) and (rows[2, 13:] == device_lib.NO_GRAPH).all()
  budget = batching.make_budgets(mutag.graphs, 16)[-1]
  graphs = device_lib.device_graphs(mutag)
  gather = jax.jit(device_lib.gather_batch, static_argnums=2)
  for ids in rows:
    device = jax.device_get(gather(graphs, ids, budget))
    host = batching._make_batch(mutag, ids[ids >= 0], [budget])
    for got, want in zip(
      jax.tree.leaves((device.graph, device.labels, device.graph_mask)),
      jax.tree.leaves((host.graph, host.labels, host.graph_mask)),
      strict=True,
    ):
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(got, want)


def test_id_rows_and_batch_sizes(mutag):
  rows = device_lib.id_rows([3, 1, 2], 2, rows=3)
  np.testing.assert_array_equal(rows, [[3, 1], [2, -1], [-1, -1]])
  with pytest.raises(ValueError, match="3 graphs need 2 rows, not 1"):
    device_lib.id_rows([3, 1, 2], 2, rows=1)
  sizes = [int(mutag.graphs[i].n_node[0]) for i in (3, 1, 2)]
  edges = [int(mutag.graphs[i].n_edge[0]) for i in (3, 1, 2)]
  assert device_lib.batch_sizes(mutag, rows) == (
    max(sizes[0] + sizes[1], sizes[2]),
    max(edges[0] + edges[1], edges[2]),
  )


def test_epoch_orders_are_the_library_shuffles(mutag):
  train = mutag.folds[2].train
  orders = graph_sweep.epoch_orders(train, 3, seed=5)
  rng = np.random.default_rng(5)
  for order in orders:
    batches = batching.iterate_batches(
      mutag,
      train,
      64,
      batching.make_budgets(mutag.graphs, 64),
      shuffle=True,
      rng=rng,
    )
    labels = np.concatenate([b.labels[b.graph_mask] for b in batches])
    np.testing.assert_array_equal(labels, mutag.labels[order])


# ---------------------------------------------------------------------------
# Runs against `train_and_evaluate`.
# ---------------------------------------------------------------------------


def _logged(workdir, seed, fold, epoch):
  with open(workdir / "metrics.jsonl") as file:
    for line in file:
      row = json.loads(line)
      if (row["seed"], row["fold"], row["epoch"]) == (seed, fold, epoch):
        return row
  raise AssertionError(f"no metrics for seed {seed} fold {fold} {epoch}")


def _cli_sweep(data_dir, workdir, capsys, *flags):
  """`lorap sweep` on MUTAG, QAT, 2 epochs, the small model of `_config`:
  its stdout and CSV rows."""
  code = cli.main(
    [
      "sweep",
      "--dataset=mutag",
      f"--data-dir={data_dir}",
      f"--workdir={workdir}",
      "--framework=qat",
      "--epochs=2",
      "--layers=2",
      "--hidden=32",
      "--no-progress",
      *flags,
    ]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  with open(workdir / "sweep.csv") as file:
    return out, list(csv.DictReader(file))


# One step (a whole fold in a batch) and the evaluation after it, FP32.
# Adam's first step is about lr * sign(gradient): a last-bit difference in
# a near-zero gradient (another summation order: a batched program, or the
# sweep's padding budgets against the library's ladder) becomes a
# step of full size. So the step's loss, computed before any update from
# the same graphs, keys and initialisation, is compared to the bit, and
# what follows the update loosely.
_LOOSE = 0.1


def test_one_run_per_call_follows_train_and_evaluate(data_dir, tmp_path):
  config = _config(data_dir, epochs=1, folds=2, framework="fp32")
  config.first_fold = 4
  config.train.batch_size = 256
  result = sweep_lib.run_sweep(config, {"seed": [3]}, chunk_size=1)
  config.seeds = 4  # The library runs seeds 0..3; seed 3 is compared.
  lorap_jax.train_and_evaluate(config, tmp_path)
  assert [r["fold"] for r in result.rows] == [4, 5]
  for row in result.rows:
    logged = _logged(tmp_path, 3, row["fold"], 0)
    assert row["best_epoch"] == 0
    assert row["train_loss"] == pytest.approx(logged["train_loss"], rel=1e-6)
    assert row["val_loss"] == pytest.approx(logged["val_loss"], rel=_LOOSE)


def test_vmapped_graph_runs_match_their_runs_alone(data_dir):
  # Two seeds x two learning rates on one fold, in chunks of 3 (the second
  # padded).
  config = _config(data_dir, epochs=1, framework="fp32")
  config.train.batch_size = 256
  grid = {"seed": [0, 1], "learning_rate": [0.01, 0.002]}
  alone = sweep_lib.run_sweep(config, grid, chunk_size=1)
  vmapped = sweep_lib.run_sweep(config, grid, chunk_size=3)
  assert len(vmapped.rows) == 4 and len(vmapped.compile_seconds) == 1
  for one, many in zip(alone.rows, vmapped.rows, strict=True):
    for key in ("seed", "learning_rate", "fold", "best_epoch"):
      assert one[key] == many[key]
    assert one["train_loss"] == pytest.approx(many["train_loss"], rel=1e-6)
    assert one["val_loss"] == pytest.approx(many["val_loss"], rel=_LOOSE)
  # The seed is an input of the program: it changes the run.
  losses = {
    (r["seed"], r["learning_rate"]): r["train_loss"] for r in alone.rows
  }
  assert losses[0, 0.01] != losses[1, 0.01]


def test_folds_of_unequal_steps_compile_apart(data_dir, mutag, monkeypatch):
  # One fold gets a graph more for training: 76 graphs a batch then make 2
  # steps an epoch on the first fold (152 graphs), 3 on the second (153),
  # and the optimizer's step schedule differs, so each step count has its
  # own program.
  first, second = mutag.folds[:2]
  moved = second._replace(
    train=np.sort(np.append(second.train, second.val[0])).astype(np.int32),
    val=second.val[1:],
  )
  changed = dataclasses.replace(mutag, folds=(first, moved))
  monkeypatch.setattr(data_lib, "load_dataset", lambda *a, **k: changed)
  config = _config(data_dir, epochs=2, folds=2, framework="fp32")
  config.train.batch_size = 76
  result = sweep_lib.run_sweep(config, {"seed": [0, 1]}, chunk_size=2)
  assert len(result.compile_seconds) == 2
  assert [(r["fold"], r["seed"]) for r in result.rows] == [
    (0, 0),
    (0, 1),
    (1, 0),
    (1, 1),
  ]
  assert all(r["diverged_epoch"] == -1 for r in result.rows)
  assert result.best_mean["folds"] == [0, 0, 1, 1]


@pytest.fixture
def mutag_as_regression(mutag, monkeypatch):
  """MUTAG with its labels as float targets: a small regression dataset,
  loaded by the sweep and by `train_and_evaluate` alike."""
  regression = dataclasses.replace(
    mutag, labels=mutag.labels.astype(np.float32) * 2.0 - 0.5, task="regression"
  )
  monkeypatch.setattr(data_lib, "load_dataset", lambda *a, **k: regression)
  return regression


def test_graph_regression_follows_train_and_evaluate(
  data_dir, mutag_as_regression, tmp_path
):
  # L1 loss on standardised targets, selection on validation MAE: the first
  # step's loss (the fold's target mean and std, the regression head) is
  # the library's, and the rows report MAE instead of accuracy.
  config = _config(data_dir, epochs=1, framework="fp32")
  config.train.selection = "val_mae"
  config.train.batch_size = 256
  result = sweep_lib.run_sweep(config, {"seed": [0]}, chunk_size=1)
  lorap_jax.train_and_evaluate(config, tmp_path)
  (row,) = result.rows
  assert "val_acc" not in row and "test_acc" not in row
  logged = _logged(tmp_path, 0, 0, 0)
  assert row["train_loss"] == pytest.approx(logged["train_loss"], rel=1e-6)
  assert row["val_mae"] == pytest.approx(logged["val_mae"], rel=_LOOSE)
  assert row["test_mae"] == pytest.approx(logged["test_mae"], rel=_LOOSE)
  assert set(result.best_mean) >= {"val_mae_mean", "test_mae_std", "folds"}


def test_regression_sweep_ranks_by_lowest_mae(
  data_dir, mutag_as_regression, tmp_path, capsys
):
  out, rows = _cli_sweep(
    data_dir, tmp_path, capsys, "--selection=val_mae", "--lr=0.01,0.001"
  )
  assert "val MAE" in out and "%" not in out
  best = json.loads((tmp_path / "best.json").read_text())["best"]
  assert best["val_mae"] == pytest.approx(
    min(float(r["val_mae"]) for r in rows)
  )


def test_regression_selection_must_fit_the_task(data_dir, mutag_as_regression):
  config = _config(data_dir, epochs=1)
  config.train.selection = "val_acc"
  with pytest.raises(ValueError, match="no accuracy to select on"):
    sweep_lib.run_sweep(config, {})


# ---------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------


def test_cli_sweeps_a_graph_dataset_over_folds(data_dir, tmp_path, capsys):
  out, rows = _cli_sweep(
    data_dir,
    tmp_path,
    capsys,
    "--prompt=lorap",
    "--folds=2",
    "--first-fold=7",
    "--lr=0.01,0.005",
  )
  assert "4 runs (2 configurations x 2 folds)" in out
  assert "2 runs: 1 seed x 2 folds" in out
  assert [(r["fold"], r["learning_rate"]) for r in rows] == [
    ("7", "0.01"),
    ("7", "0.005"),
    ("8", "0.01"),
    ("8", "0.005"),
  ]
  for row in rows:
    assert 0.0 <= float(row["val_acc"]) <= 1.0
    assert row["bits"] == "4" and row["diverged_epoch"] == "-1"
  best = json.loads((tmp_path / "best.json").read_text())
  mean = best["best_mean_over_seeds"]
  assert mean["folds"] == [7, 8] and mean["seeds"] == [0, 0]
  expected = np.mean(
    [
      float(r["val_acc"])
      for r in rows
      if r["learning_rate"] == str(mean["learning_rate"])
    ]
  )
  assert mean["val_acc_mean"] == pytest.approx(expected)
