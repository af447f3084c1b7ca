"""Vmapped hyper-parameter sweeps: grids, equivalence, outputs, the CLI."""

import csv
import json

import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import cli, sweep_cli
from lorap_jax._src import sweep as sweep_lib


def _config(data_dir, *, epochs, **overrides):
  config = lorap_jax.get_config("cora")
  config.data_dir = str(data_dir)
  config.train.epochs = epochs
  config.checkpoint.enabled = False
  config.seeds = 1
  for path, value in overrides.items():
    section, leaf = path.split("__")
    config[section][leaf] = value
  return config


# ---------------------------------------------------------------------------
# Grids and refusals (no data, nothing compiled).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("axes", "message"),
  [
    ({"momentum": [0.1]}, "unknown sweep axes ['momentum']"),
    ({"seed": []}, "sweep axis 'seed' is empty"),
    ({"learning_rate": ["fast"]}, "non-numeric value 'fast'"),
    ({"learning_rate": "0.01"}, "must be a list of numbers"),
    ({"bits": [4, 17]}, "[17.0] must be integers in 1..16"),
    ({"bits": [0]}, "must be integers in 1..16"),
    ({"seed": [0.5]}, "takes integers, not 0.5"),
    ({"weight_decay": [-1e-4]}, "values below 0"),
    ({"rank": [0, 2]}, "values below 1"),
    ({"learning_rate": [float("nan")]}, "non-finite value"),
    ({"seed": [1, 1]}, "repeats values"),
    ({"hidden": [True]}, "non-numeric value True"),
  ],
)
def test_bad_grids_are_refused(axes, message):
  with pytest.raises(ValueError, match=r"sweep axis|unknown sweep") as error:
    sweep_lib.SweepGrid.from_axes(axes)
  assert message in str(error.value)


def test_grid_resolves_left_out_axes_from_the_config():
  config = lorap_jax.get_config("cora")
  config.seeds = 3
  values = sweep_lib.SweepGrid(learning_rate=(0.1, 0.2)).resolve(config)
  assert values["seed"] == (0, 1, 2)
  assert values["learning_rate"] == (0.1, 0.2)
  assert values["prompt_learning_rate"] == (config.prompt.learning_rate,)
  assert values["bits"] == (4,) and values["rank"] == (4,)


@pytest.mark.parametrize(
  ("overrides", "axes", "error", "message"),
  [
    ({"train.selection": "val_mae"}, {}, ValueError, "'val_mae' is not"),
    ({"train.sampler": "neighbor"}, {}, NotImplementedError, "sampler"),
    ({"quant.framework": "mixq"}, {}, NotImplementedError, "in stages"),
    ({"quant.framework": "fp32"}, {"bits": [4, 8]}, ValueError, "fp32"),
    ({"prompt.kind": "none"}, {"rank": [2, 4]}, ValueError, "prompt 'none'"),
    # GPF has one prompt vector and GPF-plus no low-rank factors.
    ({"prompt.kind": "gpf"}, {"num_prompts": [4, 8]}, ValueError, "'gpf';"),
    (
      {"prompt.kind": "gpf-plus"},
      {"rank": [2, 4]},
      ValueError,
      "only lorap, gpf-lorap read it",
    ),
  ],
)
def test_configs_the_sweep_does_not_cover_are_refused(
  overrides, axes, error, message, tmp_path
):
  config = lorap_jax.get_config("cora")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(error, match=message):
    sweep_lib.run_sweep(config, axes, tmp_path)
  assert not list(tmp_path.iterdir())  # Refused before writing anything.


def test_bad_chunk_size_is_refused(tmp_path):
  with pytest.raises(ValueError, match="chunk_size=0 must be"):
    sweep_lib.run_sweep(lorap_jax.get_config("cora"), {}, chunk_size=0)


def test_best_ranks_by_accuracy_then_loss_then_order():
  def row(seed, lr, val_acc, val_loss):
    return {
      **{name: 1 for name in sweep_lib.AXES},
      "seed": seed,
      "learning_rate": lr,
      "val_acc": val_acc,
      "val_loss": val_loss,
      "test_acc": 0.5,
    }

  rows = [
    row(0, 0.1, 0.7, 1.0),
    row(1, 0.1, 0.8, float("nan")),
    row(0, 0.2, 0.8, 0.9),
    row(1, 0.2, 0.6, 0.9),
  ]
  best, best_mean = sweep_lib.select_best(rows)
  assert (best["seed"], best["learning_rate"]) == (0, 0.2)
  # Means: lr 0.1 -> 0.75 (NaN loss), lr 0.2 -> 0.70.
  assert best_mean["learning_rate"] == 0.1
  assert best_mean["seeds"] == [0, 1]
  assert best_mean["val_acc_mean"] == pytest.approx(0.75)
  assert best_mean["val_acc_std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))


@pytest.mark.parametrize(
  ("flag", "text", "kind", "expected"),
  [
    ("seeds", "0:4", int, [0, 1, 2, 3]),
    ("seeds", "3, 7", int, [3, 7]),
    ("lr", "0.01,5e-3", float, [0.01, 0.005]),
    ("bits", "4,8", int, [4, 8]),
  ],
)
def test_cli_axis_values(flag, text, kind, expected):
  assert sweep_cli.parse_axis(flag, text, kind) == expected


@pytest.mark.parametrize(
  ("flag", "text", "kind", "message"),
  [
    ("seeds", "4:2", int, "empty range"),
    ("lr", "0.01,", float, "comma-separated list"),
    ("lr", "fast", float, "'fast' is not a number"),
    ("bits", "4.5", int, "not an integer"),
    ("seeds", "a:b", int, "START:STOP"),
  ],
)
def test_cli_bad_axis_values(flag, text, kind, message):
  with pytest.raises(ValueError, match=message):
    sweep_cli.parse_axis(flag, text, kind)


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--bits=4,32"], "[32.0] must be integers in 1..16"),
    (["--lr=0.01,x"], "'x' is not a number"),
    (["--selection=val_mae"], "'val_mae' is not one of"),
    (["--set=train.momentum=3"], "unknown config field"),
    # 0 is a value given: checked by presence, not truth.
    (["--first-fold=0"], "first_fold: cross-validation folds belong to"),
  ],
)
def test_cli_sweep_refuses_bad_input(flags, message, tmp_path, capsys):
  argv = ["sweep", "--dataset=cora", f"--workdir={tmp_path}", *flags]
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Equivalence with the one-run path (Cora, a few epochs).
# ---------------------------------------------------------------------------


def test_vmapped_configurations_match_train_and_evaluate(data_dir, tmp_path):
  # FP32: the vmapped program differs from the one-run program only in
  # floating-point summation order. Two learning rates x two seeds in
  # chunks of 3: the second chunk is padded. The rates halve every 2 epochs.
  config = _config(
    data_dir,
    epochs=6,
    quant__framework="fp32",
    prompt__kind="lorap",
    train__lr_decay_every=2,
  )
  result = sweep_lib.run_sweep(
    config,
    {"seed": [0, 1], "learning_rate": [0.01, 0.05]},
    chunk_size=3,
  )
  assert len(result.rows) == 4 and len(result.compile_seconds) == 1
  config.seeds, config.train.learning_rate = 2, 0.05
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  swept = [r for r in result.rows if r["learning_rate"] == 0.05]
  assert [r["seed"] for r in swept] == [0, 1]
  assert [r["best_epoch"] for r in swept] == summary["best_epochs"]
  for key in ("val_acc", "test_acc"):
    np.testing.assert_allclose(
      [r[key] for r in swept], summary[f"{key}s"], atol=1e-9
    )
  # The other learning rate trained differently (the injected value counts).
  other = [r for r in result.rows if r["learning_rate"] == 0.01]
  assert [r["train_loss"] for r in other] != [r["train_loss"] for r in swept]


def test_one_run_per_call_reproduces_train_and_evaluate(data_dir, tmp_path):
  # QAT + LoRAP at 3 bits, learning rates and weight decay off their
  # defaults, one configuration per call (the CPU default): the scanned run
  # reproduces the library's run, quantization roundings included.
  config = _config(data_dir, epochs=5)
  point = {
    "learning_rate": [0.02],
    "prompt_learning_rate": [0.003],
    "weight_decay": [1e-3],
    "bits": [3],
  }
  result = sweep_lib.run_sweep(config, {"seed": [0], **point}, chunk_size=1)
  (row,) = result.rows
  config.train.learning_rate = 0.02
  config.prompt.learning_rate = 0.003
  config.train.weight_decay = 1e-3
  config.quant.bits = 3
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  assert row["best_epoch"] == summary["best_epochs"][0]
  assert row["val_acc"] == summary["val_accs"][0]
  assert row["test_acc"] == summary["test_accs"][0]
  assert row["diverged_epoch"] == -1 and row["bits"] == 3


# ---------------------------------------------------------------------------
# Structural axes, outputs and the command line.
# ---------------------------------------------------------------------------


def test_cli_sweep_compiles_once_per_structure(
  data_dir, tmp_path, capsys, monkeypatch
):
  traces = []
  make = sweep_lib.make_sweep_run

  def counting(config, model):
    run_one = make(config, model)

    def counted(*args):
      traces.append(config.prompt.rank)
      return run_one(*args)

    return counted

  monkeypatch.setattr(sweep_lib, "make_sweep_run", counting)
  code = cli.main(
    [
      "sweep",
      "--dataset=cora",
      f"--data-dir={data_dir}",
      f"--workdir={tmp_path}",
      "--framework=qat",
      "--prompt=lorap",
      "--epochs=2",
      "--seeds=0:2",
      "--bits=4,8",
      "--rank=1,2",
      "--chunk-size=2",
      "--no-progress",
    ]
  )
  assert code == 0, capsys.readouterr().err
  assert "8 configurations" in capsys.readouterr().out
  # Two structures (ranks), two chunks each: one trace per structure.
  assert traces == [1, 2]
  with open(tmp_path / "sweep.csv") as file:
    rows = list(csv.DictReader(file))
  assert len(rows) == 8
  assert list(rows[0])[: len(sweep_lib.AXES)] == list(sweep_lib.AXES)
  assert {(r["rank"], r["seed"], r["bits"]) for r in rows} == {
    (rank, seed, bits)
    for rank in ("1", "2")
    for seed in ("0", "1")
    for bits in ("4", "8")
  }
  for row in rows:
    assert 0.0 <= float(row["val_acc"]) <= 1.0
    assert 0 <= int(row["best_epoch"]) < 2
    assert row["learning_rate"] == "0.01" and row["diverged_epoch"] == "-1"
  # Bits are an array of the vmapped program: the widths train differently.
  losses = {r["bits"]: r["train_loss"] for r in rows if r["seed"] == "0"}
  assert losses["4"] != losses["8"]
  best = json.loads((tmp_path / "best.json").read_text())
  assert best["num_configurations"] == 8
  assert len(best["compile_seconds"]) == 2
  top = max(float(r["val_acc"]) for r in rows)
  assert best["best"]["val_acc"] == pytest.approx(top)
  assert best["best_mean_over_seeds"]["seeds"] == [0, 1]
  assert json.loads((tmp_path / "config.json").read_text())["dataset"] == (
    "cora"
  )
