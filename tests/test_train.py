"""End-to-end training: the library function and the command line."""

import importlib.metadata
import json
import re
import subprocess

import chex
import jax
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT

import lorap_jax
from lorap_jax._src import cli, train
from lorap_jax._src import config as config_lib
from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib


def _small_config(dataset, **overrides):
  config = lorap_jax.get_config(dataset)
  config.seeds = 1
  config.folds = 1
  config.train.epochs = overrides.pop("epochs", 30)
  for path, value in overrides.items():
    section, _, leaf = path.rpartition("__")
    (config[section] if section else config)[leaf] = value
  return config


def test_cora_fp32_gcn_learns(data_dir, tmp_path):
  config = _small_config("cora", quant__framework="fp32", prompt__kind="none")
  config.data_dir = str(data_dir)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  # Kipf's GCN passes 75% on Cora within 30 epochs; chance is ~30%.
  assert summary["test_acc_mean"] > 0.75
  written = json.loads((tmp_path / "summary.json").read_text())
  for key in ("test_acc_mean", "test_acc_std", "val_acc_mean"):
    assert written[key] == pytest.approx(summary[key])
  assert written["epoch_time_ms_median"] > 0
  assert written["config"]["dataset"] == "cora"
  assert written["code_version"] == train.code_version()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 30
  assert {"epoch", "val_acc", "test_acc", "epoch_ms"} <= json.loads(
    lines[0]
  ).keys()


def test_cora_int4_lorap_trains(data_dir, tmp_path):
  config = _small_config("cora", epochs=40)
  config.data_dir = str(data_dir)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  assert summary["bits"] == 4 and summary["prompt"] == "lorap"
  assert summary["num_prompt_params"] == sum(
    lorap_jax.lorap_parameter_count(d, 10, 4) for d in (64, 7)
  )
  # INT4 plain QAT + LoRAP reaches ~70% here; a collapse gives ~30%.
  assert summary["test_acc_mean"] > 0.6


# GIN end to end runs on MUTAG below; PROTEINS' 890 training graphs take
# 90 s: on request.
@pytest.mark.slow
def test_proteins_gin_one_fold(data_dir, tmp_path):
  config = _small_config("proteins", epochs=5)
  config.data_dir = str(data_dir)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  assert summary["num_runs"] == 1
  assert 0.5 < summary["test_acc_mean"] <= 1.0


def test_a_later_fold_alone_matches_it_in_the_full_run(
  data_dir, tmp_path, monkeypatch
):
  # first_fold splits a protocol over sessions: each fold's run depends on
  # its seed and split only, so alone it gives what the full loop gives.
  config = _small_config("mutag", epochs=3, folds=2)
  config.data_dir = str(data_dir)
  # A small model in one batch per epoch (still shuffled): few compiles.
  config.model.num_layers, config.model.hidden = 2, 16
  config.train.batch_size = 256
  # The full run as if its memory mappings ran low: the compiled programs
  # are dropped after each fold, and fold 1 compiles them again.
  monkeypatch.setattr(train, "memory_mapping_share", lambda: 0.9)
  both = lorap_jax.train_and_evaluate(config, tmp_path / "both")
  assert steps_lib.train_step._cache_size() == 0
  monkeypatch.undo()
  config.first_fold, config.folds = 1, 1
  alone = lorap_jax.train_and_evaluate(config, tmp_path / "alone")
  assert alone["test_accs"] == both["test_accs"][1:]

  def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["fold"], r["train_loss"], r["val_loss"]) for r in records]

  assert losses(tmp_path / "alone") == losses(tmp_path / "both")[3:]
  assert {fold for fold, *_ in losses(tmp_path / "alone")} == {1}


def test_cli_train_writes_summary(data_dir, tmp_path, capsys):
  code = cli.main(
    [
      "train",
      "--dataset=cora",
      "--model=gcn",
      "--framework=qat",
      "--bits=4",
      "--prompt=gpf-lorap",
      "--rank=2",
      "--num-prompts=3",
      "--epochs=3",
      "--seeds=2",
      f"--data-dir={data_dir}",
      f"--workdir={tmp_path}",
      "--no-progress",
    ]
  )
  assert code == 0
  out = capsys.readouterr().out
  assert "test accuracy" in out and "INT4" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["num_runs"] == 2
  assert summary["config"]["prompt"]["rank"] == 2


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--dataset=coraa"], "Unknown dataset 'coraa'"),
    (["--dataset=cora", "--model=sage"], "unknown model 'sage'"),
    (["--dataset=cora", "--framework=int4"], "unknown framework 'int4'"),
    (["--dataset=cora", "--prompt=lora"], "unknown prompt 'lora'"),
    (["--dataset=cora", "--bits=0"], r"bits=\[0.0\] must be integers in 1..16"),
    (["--dataset=cora", "--bits=17"], r"bits=\[17.0\] must be integers"),
    (["--dataset=cora", "--rank=0"], "--rank=0 must be at least 1"),
    (["--dataset=cora", "--num-prompts=-2"], "--num-prompts=-2 must be"),
    (["--dataset=cora", "--set", "train.nope=1"], "unknown config field"),
    (
      ["--dataset=mutag", "--set", "train.padding_growth=0.9"],
      r"train.padding_growth=0.9 must be 0 \(three coarse padding sizes\)",
    ),
    (["--dataset=mutag", "--first-fold=-1"], "first_fold=-1 must be"),
    (["--dataset=cora", "--lr=-0.01"], r"train.learning_rate=-0.01 must be"),
    (["--dataset=cora", "--weight-decay=-1"], "train.weight_decay=-1.0 must"),
    (["--dataset=cora", "--prompt-lr=nan"], "prompt.learning_rate=nan must"),
    (
      ["--dataset=cora", "--framework=a2q", "--set", "a2q.lr_step_xw=-1e-3"],
      r"a2q.lr_step_xw=-0.001 must be a finite number >= 0",
    ),
    (
      ["--dataset=mutag", "--set", "train.lr_decay_factor=0"],
      r"train.lr_decay_factor=0.0 must be in \(0, 1\]",
    ),
    (
      ["--dataset=mutag", "--set", "train.lr_decay_every=-5"],
      "train.lr_decay_every=-5 must be an integer >= 0",
    ),
    (["--dataset=cora", "--set", "train.epochs"], "must look like KEY=VALUE"),
    (
      ["--dataset=cora", "--set", "model.dropout=1.0"],
      r"dropout=1.0 must be in \[0, 1\)",
    ),
    (
      ["--dataset=mutag", "--set", "model.readout=sort"],
      "readout='sort' is not one of",
    ),
    (
      ["--dataset=cora", "--model=gat", "--hidden=10", "--set=model.heads=4"],
      "hidden=10 must be a multiple of heads=4",
    ),
    (
      ["--dataset=cora", "--framework=a2q", "--set=quant.points=input,weight"],
      "quant.points='input,weight' does not apply to framework 'a2q': set "
      "a2q.points",
    ),
    (
      ["--dataset=cora", "--framework=a2q", "--set=a2q.points=input,message"],
      r"A2Q quantizes the points .*, not \['message'\]",
    ),
    (
      ["--dataset=cora", "--framework=a2q", "--set=quant.gradient=identity"],
      "quant.gradient='identity' does not apply to framework 'a2q', which "
      "uses learned steps",
    ),
    (
      [
        "--dataset=mutag",
        "--framework=dq",
        "--set=quant.calibration=running",
        "--set=quant.momentum=0.5",
      ],
      "quant.calibration='running', quant.momentum=0.5 does not apply to "
      "framework 'dq', which uses percentile ranges at dq.percentile",
    ),
    (
      ["--dataset=mutag", "--vmap-seeds"],
      "vmap_seeds=True: a graph task trains its runs one after another",
    ),
    (
      ["--dataset=cora", "--framework=mixq", "--vmap-seeds"],
      "vmap_seeds=True: MixQ's staged schedule trains",
    ),
    (
      ["--dataset=cora", "--framework=mixq", "--set=quant.rounding=half_away"],
      "quant.rounding='half_away' does not apply to framework 'mixq'",
    ),
    # A node task would ignore them.
    (
      ["--dataset=citeseer", "--folds=3", "--set=first_fold=1"],
      "first_fold and folds: cross-validation folds belong to graph "
      "datasets; citeseer is a node dataset, whose runs range over seeds",
    ),
  ],
)
def test_cli_refuses_bad_input(flags, message, tmp_path, capsys):
  code = cli.main(["train", f"--workdir={tmp_path}", *flags])
  assert code == 2
  err = capsys.readouterr().err
  assert "lorap: error:" in err
  assert re.search(message, err), err


def test_model_settings_are_checked_as_the_model_uses_them():
  config = lorap_jax.get_config("cora")
  config.model.architecture = "gat"
  config.model.hidden, config.model.heads = 12, 4
  # The early check once compared the width with the default 8 heads.
  train.validate_config(config)
  model = state_lib.create_model(config, num_classes=7, task="node")
  assert (model.model.hidden, model.model.heads) == (12, 4)


@pytest.mark.parametrize(
  "framework, field", [("qat", "quant"), ("a2q", "a2q"), ("mixq", "mixq")]
)
def test_points_settings_drop_blank_entries(framework, field):
  config = lorap_jax.get_config("cora")
  config.quant.framework = framework
  config[field].points = " input , weight, "
  # A blank between commas once became a point named ''.
  assert state_lib.quant_config(config).points == ("input", "weight")


def test_degree_quant_reads_the_rounding_setting():
  config = lorap_jax.get_config("mutag")
  config.quant.framework = "dq"
  config.quant.rounding = "half_away"
  # Refused for A2Q and MixQ, which do not read it; Degree-Quant does.
  assert state_lib.quant_config(config).rounding == "half_away"


def test_cli_refuses_folds_the_dataset_lacks(data_dir, tmp_path, capsys):
  """Checked against the loaded dataset's folds, so it needs the data."""
  flags = ["--dataset=mutag", "--first-fold=8", "--folds=3"]
  code = cli.main(
    ["train", f"--workdir={tmp_path}", f"--data-dir={data_dir}", *flags]
  )
  assert code == 2
  err = capsys.readouterr().err
  assert re.search(
    r"lorap: error: .*asks for folds 8..10, but mutag has 10 \(0..9\)", err
  ), err


def test_cli_gives_mixq_its_node_settings_unless_told_otherwise():
  def config_of(*flags):
    args = cli._parser().parse_args(["train", "--workdir=w", *flags])
    return cli.build_config(args)

  config = config_of("--dataset=cora", "--framework=mixq")
  assert (config.model.hidden, config.train.weight_decay) == (128, 2e-4)
  config = config_of(
    "--dataset=cora",
    "--set",
    "quant.framework=mixq",
    "--hidden=64",
    "--set",
    "train.weight_decay=0.0",
  )
  assert (config.model.hidden, config.train.weight_decay) == (64, 0.0)
  # Other frameworks, and MixQ on graph tasks, keep the dataset's settings.
  cora, mutag = lorap_jax.get_config("cora"), lorap_jax.get_config("mutag")
  config = config_of("--dataset=cora", "--framework=qat")
  assert config.model.hidden == cora.model.hidden == 64
  assert config.train.weight_decay == cora.train.weight_decay == 5e-4
  config = config_of("--dataset=mutag", "--framework=mixq")
  assert config.model.hidden == mutag.model.hidden
  assert config.train.weight_decay == mutag.train.weight_decay


def test_cli_set_gives_text_fields_their_text():
  args = cli._parser().parse_args(
    [
      "train",
      "--workdir=w",
      "--dataset=cora",
      "--set=mixq.candidates=8",
      "--set=mixq.points=input,weight",
      "--set=prompt.implementation=None",
      "--set=train.epochs=7",
    ]
  )
  config = cli.build_config(args)
  # Literals once turned "8" into 8 and "4,8" into a tuple: both refused.
  assert config.mixq.candidates == "8"
  assert config.mixq.points == "input,weight"
  assert config.prompt.implementation is None
  assert config.train.epochs == 7


def test_cli_keeps_the_case_of_npz_paths():
  args = cli._parser().parse_args(
    ["train", "--dataset=npz/Amazon_Photo.npz", "--workdir=w"]
  )
  assert cli.build_config(args).dataset == "npz/Amazon_Photo.npz"
  args = cli._parser().parse_args(["train", "--dataset=CORA", "--workdir=w"])
  assert cli.build_config(args).dataset == "cora"


def test_cli_missing_data_dir_names_the_file(tmp_path, capsys):
  code = cli.main(
    [
      "train",
      "--dataset=cora",
      f"--data-dir={tmp_path}",
      f"--workdir={tmp_path / 'run'}",
      "--no-progress",
    ]
  )
  assert code == 2
  err = capsys.readouterr().err
  assert "ind.cora" in err and str(tmp_path) in err


def test_vmapped_seeds_match_sequential_runs(data_dir, tmp_path):
  summaries = []
  for vmapped in (False, True):
    config = _small_config(
      "cora", epochs=15, quant__framework="fp32", prompt__kind="lorap"
    )
    config.seeds, config.vmap_seeds = 3, vmapped
    config.data_dir = str(data_dir)
    summaries.append(
      lorap_jax.train_and_evaluate(config, tmp_path / str(vmapped))
    )
  sequential, batched = summaries
  # Same keys per seed; FP32 leaves only summation-order differences.
  assert batched["num_runs"] == 3
  for key in ("val_accs", "test_accs"):
    assert batched[key] == pytest.approx(sequential[key], abs=0.01)
  assert "seeds vmapped" in batched["protocol"]
  lines = (tmp_path / "True" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3 * 15


def test_cli_summary_of_a_two_epoch_run(data_dir, tmp_path, capsys):
  # Both epochs include compilation: no steady-state time to report.
  code = cli.main(
    [
      "train",
      "--dataset=cora",
      "--framework=fp32",
      "--prompt=none",
      "--epochs=2",
      "--seeds=1",
      f"--data-dir={data_dir}",
      f"--workdir={tmp_path}",
      "--no-progress",
    ]
  )
  assert code == 0
  assert "epoch time     n/a (no epoch after the first two)" in (
    capsys.readouterr().out
  )


def test_memory_mapping_share_reads_the_kernels_counts():
  share = train.memory_mapping_share()
  # Linux (CI): this process uses some, far from all, of its mappings.
  assert share is None or 0 < share < train.MAPPING_SHARE_BEFORE_RELEASE
  assert not train.release_compiled_code_if_needed()


def test_code_version_names_the_commit_or_the_package(monkeypatch):
  train.code_version.cache_clear()
  version = train.code_version()
  head = subprocess.run(
    ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
    capture_output=True,
    text=True,
    check=False,
  )
  if head.returncode == 0:  # A git checkout, as in CI.
    assert version.removesuffix("+changes") == head.stdout.strip()
  else:
    assert version.startswith("lorap-jax ")

  def no_git(*args, **kwargs):
    raise FileNotFoundError("git")

  monkeypatch.setattr(subprocess, "run", no_git)
  train.code_version.cache_clear()
  try:
    assert train.code_version() == "lorap-jax " + importlib.metadata.version(
      "lorap-jax"
    )
  finally:
    monkeypatch.undo()
    train.code_version.cache_clear()


def test_a_run_is_credited_to_the_code_it_started_with(
  data_dir, tmp_path, monkeypatch
):
  versions = iter(["at-start", "committed-during-the-run"])
  monkeypatch.setattr(train, "code_version", lambda: next(versions))
  config = _small_config("cora", epochs=2)
  config.data_dir = str(data_dir)
  summary = lorap_jax.train_and_evaluate(config, tmp_path)
  # It once read the version when writing the summary, hours later.
  assert summary["code_version"] == "at-start"


def test_mean_and_std_is_the_sample_std():
  # torch.std's (ddof 1), which the anchors' tables report.
  assert lorap_jax.mean_and_std([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
  assert lorap_jax.mean_and_std([0.75]) == (0.75, 0.0)
  with pytest.raises(ValueError, match="at least one value"):
    lorap_jax.mean_and_std([])


# --- The optimizer's hyper-parameters live in its state -----------------------


def _csbm_inputs(**overrides):
  config = _small_config(
    "csbm", quant__framework="a2q", prompt__kind="lorap", **overrides
  )
  config.csbm.num_nodes = 300
  dataset = lorap_jax.load_dataset(
    "csbm", None, **train.dataset_options(config)
  )
  model = lorap_jax.create_model(
    config, num_classes=dataset.num_classes, task="node"
  )
  graph, eval_batch = runs_lib.node_inputs(dataset, config)
  batch = lorap_jax.Batch(graph, eval_batch.labels, eval_batch.masks["train"])
  return config, model, graph, batch


OFF_DEFAULT = {
  "train__learning_rate": 0.003,
  "train__weight_decay": 1e-3,
  "prompt__learning_rate": 0.02,
  "prompt__weight_decay": 2e-4,
  "a2q__lr_step_feature": 0.05,
}


def test_initial_train_state_holds_the_configs_hyperparameters():
  config, model, graph, _ = _csbm_inputs(**OFF_DEFAULT)
  state = state_lib.initial_train_state(config, model, graph, jax.random.key(0))
  # The uncached optimizer, built with the values themselves.
  want = lorap_jax.create_optimizer(config).init(state.params)
  chex.assert_trees_all_equal(state.opt_state, want)
  backbone = state.opt_state.inner_states["backbone"].inner_state
  np.testing.assert_allclose(backbone.hyperparams["learning_rate"], 0.003)


def test_a_new_learning_rate_reuses_the_compiled_steps():
  config, model, graph, batch = _csbm_inputs()
  changed, *_ = _csbm_inputs(**OFF_DEFAULT)
  key, rng = jax.random.key(0), jax.random.key(1)
  first = state_lib.initial_train_state(config, model, graph, key)
  second = state_lib.initial_train_state(changed, model, graph, key)
  assert first.tx is second.tx
  assert state_lib._optimizer(config, steps_per_epoch=3) is first.tx
  steps_lib.train_step(first, batch, rng)
  compiled = steps_lib.train_step._cache_size()
  stepped, _ = steps_lib.train_step(second, batch, rng)
  assert steps_lib.train_step._cache_size() == compiled
  # The same step as with an optimizer built from `changed` itself.
  fresh = lorap_jax.create_train_state(
    model, lorap_jax.create_optimizer(changed), graph, key, changed.quant.bits
  )
  want, _ = steps_lib.train_step(fresh, batch, rng)
  chex.assert_trees_all_close(stepped.params, want.params, rtol=1e-6)


def test_a_step_decay_keeps_the_learning_rates_injected():
  # The decay is built inside the optimizer from the injected rates: a new
  # rate shares the optimizer, and only the epoch length is structure.
  config, model, graph, batch = _csbm_inputs(train__lr_decay_every=1)
  changed, *_ = _csbm_inputs(train__lr_decay_every=1, **OFF_DEFAULT)
  key, rng = jax.random.key(0), jax.random.key(1)
  first = state_lib.initial_train_state(config, model, graph, key)
  second = state_lib.initial_train_state(changed, model, graph, key)
  assert first.tx is second.tx
  assert state_lib._optimizer(config, steps_per_epoch=3) is not first.tx
  # Bitwise the same three steps (two decays) as with the configured rates
  # decayed by a schedule given to `inject_hyperparams` (the form before).
  decayed = {
    group: optax.inject_hyperparams(
      state_lib._adam_with_l2, static_args=("decay_every_steps", "decay_factor")
    )(
      learning_rate=optax.exponential_decay(
        values["learning_rate"], 1, 0.5, staircase=True
      ),
      weight_decay=values["weight_decay"],
    )
    for group, values in state_lib.injected_hyperparameters(changed).items()
  }
  decayed["a2q_frozen"] = optax.set_to_zero()
  want = lorap_jax.create_train_state(
    model,
    optax.multi_transform(decayed, state_lib.parameter_groups),
    graph,
    key,
    changed.quant.bits,
  )
  for _ in range(3):
    second, _ = steps_lib.train_step(second, batch, rng)
    want, _ = steps_lib.train_step(want, batch, rng)
  chex.assert_trees_all_equal(second.params, want.params)


def test_a_second_run_at_another_learning_rate_compiles_nothing(tmp_path):
  config = _small_config("csbm", epochs=3, checkpoint__enabled=False)
  config.csbm.num_nodes = 300
  # Equal models are one object: `TrainState.apply_fn` is its bound method.
  assert lorap_jax.create_model(
    config, num_classes=4, task="node"
  ) is lorap_jax.create_model(
    config.copy_and_resolve_references(), num_classes=4, task="node"
  )
  lorap_jax.train_and_evaluate(config, tmp_path / "first")
  compiled = (
    steps_lib.train_step._cache_size(),
    steps_lib.eval_step._cache_size(),
  )
  config.train.learning_rate = 0.002
  config.train.weight_decay = 1e-3
  lorap_jax.train_and_evaluate(config, tmp_path / "second")
  assert (
    steps_lib.train_step._cache_size(),
    steps_lib.eval_step._cache_size(),
  ) == (compiled)


@pytest.mark.parametrize(
  ("dataset", "folds", "expected"),
  [
    ("cora", 10, "seeds"),  # Node tasks: one split per seed, folds unused.
    ("mutag", 10, "folds x seeds"),
    ("mutag", 1, "seeds"),
    ("aqsol", None, "seeds"),  # Its config's one fixed split.
    ("mnist-superpixels", None, "seeds"),
  ],
)
def test_runs_of_names_what_the_runs_range_over(dataset, folds, expected):
  config = lorap_jax.get_config(dataset)
  if folds is not None:
    config.folds = folds
  assert lorap_jax.runs_of(config) == expected
  assert lorap_jax.runs_of(config.to_dict()) == expected


def test_with_fields_copies_and_leaves_the_original_alone():
  config = lorap_jax.get_config("cora")
  changed = config_lib.with_fields(
    config, {"train.epochs": 3, "quant.framework": "dq"}
  )
  assert (changed.train.epochs, changed.quant.framework) == (3, "dq")
  assert (config.train.epochs, config.quant.framework) == (200, "qat")
  with pytest.raises(KeyError):
    config_lib.with_fields(config, {"nosuch.field": 1})
