"""Checkpoints: resume after SIGKILL, corrupt fallback, refusals, NaN stop."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import checkpoints, cli
from lorap_jax._src import steps as steps_lib

# Fields that must match bitwise between an interrupted and a clean run.
RESULT_KEYS = ("test_accs", "val_accs", "best_epochs", "test_acc_mean")


def _cora_config(data_dir, epochs=20, every=5):
  config = lorap_jax.get_config("cora")
  config.prompt.kind = "lorap"
  config.seeds, config.train.epochs = 1, epochs
  config.checkpoint.every = every
  config.checkpoint.min_interval_s = 0.0  # Every `every` epochs.
  config.data_dir = str(data_dir)
  return config


def _mutag_config(data_dir):
  config = lorap_jax.get_config("mutag")
  config.folds, config.train.epochs = 1, 6
  config.model.num_layers, config.model.hidden = 2, 16
  config.prompt.kind = "none"
  # One batch per epoch (still shuffled): one padding budget, few compiles.
  config.train.batch_size = 256
  config.checkpoint.every = 2
  config.checkpoint.min_interval_s = 0.0
  config.data_dir = str(data_dir)
  return config


def _epoch_rows(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without the wall-clock column."""
  rows = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    row.pop("epoch_ms")
    rows.append(row)
  return rows


def _assert_same_results(a: dict, b: dict):
  for key in RESULT_KEYS:
    assert a[key] == b[key], key


@pytest.fixture(scope="module")
def clean_mutag(data_dir, tmp_path_factory):
  """An uninterrupted MUTAG run: (summary, workdir)."""
  workdir = tmp_path_factory.mktemp("clean-mutag")
  summary = lorap_jax.train_and_evaluate(_mutag_config(data_dir), workdir)
  return summary, workdir


def test_two_runs_with_one_seed_agree_bitwise(data_dir, tmp_path, clean_mutag):
  first, first_dir = clean_mutag
  again = lorap_jax.train_and_evaluate(_mutag_config(data_dir), tmp_path)
  _assert_same_results(first, again)
  assert _epoch_rows(first_dir) == _epoch_rows(tmp_path)


def test_sigkill_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
  clean = lorap_jax.train_and_evaluate(
    _cora_config(data_dir), tmp_path / "clean"
  )
  workdir = tmp_path / "killed"
  script = (
    "import sys, lorap_jax\n"
    "config = lorap_jax.get_config('cora')\n"
    "config.prompt.kind = 'lorap'\n"
    "config.seeds, config.train.epochs = 1, 20\n"
    "config.checkpoint.every = 5\n"
    "config.checkpoint.min_interval_s = 0.0\n"
    f"config.data_dir = {str(data_dir)!r}\n"
    f"lorap_jax.train_and_evaluate(config, {str(workdir)!r})\n"
  )
  process = subprocess.Popen([sys.executable, "-c", script])
  # Kill it after its second checkpoint (epoch 9).
  latest = workdir / "checkpoints" / "seed_0" / "latest"
  deadline = time.monotonic() + 300
  while not (latest.is_dir() and any(latest.glob("9"))):
    assert process.poll() is None, "the run ended before it could be killed"
    assert time.monotonic() < deadline, "no checkpoint appeared in time"
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert not (workdir / "summary.json").exists()
  compiled = _compiled_step_count()
  resumed = lorap_jax.train_and_evaluate(
    _cora_config(data_dir), workdir, resume=True
  )
  _assert_same_results(resumed, clean)
  assert _epoch_rows(workdir) == _epoch_rows(tmp_path / "clean")
  # The restored state is placed as a fresh one: the clean run's compiled
  # steps serve the resumed run (committed arrays would compile anew).
  assert _compiled_step_count() == compiled


def _compiled_step_count() -> int:
  return steps_lib.train_step._cache_size() + steps_lib.eval_step._cache_size()


def _forget_the_end(workdir: pathlib.Path, run: str, epochs: list[int]):
  """Turns a finished run back into one interrupted after its checkpoints
  `epochs` were removed."""
  (workdir / "checkpoints" / run / "record.json").unlink()
  for epoch in epochs:
    for path in (workdir / "checkpoints" / run / "latest").glob(str(epoch)):
      for file in sorted(path.rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
      path.rmdir()


def _remove(path: pathlib.Path):
  for file in sorted(path.rglob("*"), reverse=True):
    file.unlink() if file.is_file() else file.rmdir()
  path.rmdir()


def test_vmapped_seeds_resume_like_an_uninterrupted_run(data_dir, tmp_path):
  config = _cora_config(data_dir, epochs=8, every=2)
  config.seeds, config.vmap_seeds = 2, True
  clean = lorap_jax.train_and_evaluate(config, tmp_path / "clean")
  workdir = tmp_path / "b"
  shutil.copytree(tmp_path / "clean", workdir)
  # Killed after epoch 3: the later checkpoints never happened.
  _forget_the_end(workdir, "seeds_vmapped", [5, 7])
  resumed = lorap_jax.train_and_evaluate(config, workdir, resume=True)
  _assert_same_results(resumed, clean)
  assert _epoch_rows(workdir) == _epoch_rows(tmp_path / "clean")
  # A finished vmapped run is read back, not retrained.
  again = lorap_jax.train_and_evaluate(config, workdir, resume=True)
  _assert_same_results(again, clean)


def test_mixq_resumes_inside_a_stage_and_skips_finished_ones(
  data_dir, tmp_path
):
  config = _cora_config(data_dir, every=2)
  config.quant.framework, config.prompt.kind = "mixq", "none"
  config.mixq.search_epochs = config.mixq.fp32_epochs = 4
  config.mixq.finetune_epochs = 4
  clean = lorap_jax.train_and_evaluate(config, tmp_path / "clean")
  workdir = tmp_path / "b"
  shutil.copytree(tmp_path / "clean", workdir)
  # Killed in the FP32 stage after its epoch-1 checkpoint.
  _forget_the_end(workdir, "seed_0/fp32", [3])
  _remove(workdir / "checkpoints" / "seed_0" / "fixed")
  resumed = lorap_jax.train_and_evaluate(config, workdir, resume=True)
  _assert_same_results(resumed, clean)
  assert resumed["mixq_selected_bits"] == clean["mixq_selected_bits"]
  assert _epoch_rows(workdir) == _epoch_rows(tmp_path / "clean")


def test_graph_run_resumes_its_shuffling(data_dir, tmp_path, clean_mutag):
  clean, clean_dir = clean_mutag
  workdir = tmp_path / "b"
  lorap_jax.train_and_evaluate(_mutag_config(data_dir), workdir)
  _forget_the_end(workdir, "fold_0_seed_0", [5])
  resumed = lorap_jax.train_and_evaluate(
    _mutag_config(data_dir), workdir, resume=True
  )
  _assert_same_results(resumed, clean)
  assert _epoch_rows(workdir) == _epoch_rows(clean_dir)


def test_a_truncated_newest_checkpoint_falls_back(
  data_dir, tmp_path, clean_mutag
):
  clean, _ = clean_mutag
  workdir = tmp_path / "b"
  lorap_jax.train_and_evaluate(_mutag_config(data_dir), workdir)
  run = workdir / "checkpoints" / "fold_0_seed_0"
  (run / "record.json").unlink()
  newest = run / "latest" / "5"
  for file in newest.rglob("*"):
    if file.is_file() and file.stat().st_size > 0:
      file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
  with pytest.warns(UserWarning, match=r"latest/5 is unreadable .* falling"):
    resumed = lorap_jax.train_and_evaluate(
      _mutag_config(data_dir), workdir, resume=True
    )
  _assert_same_results(resumed, clean)


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(
  data_dir, tmp_path
):
  config = _cora_config(data_dir, epochs=40, every=1)
  config.seeds = 1
  config.train.learning_rate = 1e38  # Parameters overflow within steps.
  with pytest.raises(FloatingPointError) as raised:
    lorap_jax.train_and_evaluate(config, tmp_path)
  message = str(raised.value)
  assert "non-finite training loss" in message
  assert "seed 0 at epoch" in message and "optimizer step" in message
  assert "last good checkpoint (epoch" in message
  assert str(tmp_path / "checkpoints" / "seed_0") in message


def test_refusals_name_the_problem(data_dir, tmp_path, clean_mutag, capsys):
  _, saved = clean_mutag
  # A second run into the same workdir would overwrite its checkpoints.
  with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
    lorap_jax.train_and_evaluate(_mutag_config(data_dir), saved)
  changed = _mutag_config(data_dir)
  changed.train.learning_rate = 0.5
  with pytest.raises(
    ValueError, match=r"different config: train.learning_rate: saved 0.01"
  ):
    lorap_jax.train_and_evaluate(changed, saved, resume=True)
  with pytest.raises(ValueError, match="nothing to resume in"):
    lorap_jax.train_and_evaluate(
      _mutag_config(data_dir), tmp_path / "empty", resume=True
    )
  unsaved = _cora_config(data_dir)
  unsaved.checkpoint.enabled = False
  with pytest.raises(ValueError, match="--resume needs checkpoints"):
    lorap_jax.train_and_evaluate(unsaved, tmp_path / "v", resume=True)
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  code = cli.main(
    ["train", "--dataset=cora", f"--workdir={blocker / 'run'}", "--no-progress"]
  )
  assert code == 2
  assert "is not writable" in capsys.readouterr().err


def test_a_selected_state_of_another_layout_is_refused_by_name(tmp_path):
  # As a run saved before the step decay moved into the optimizer's state.
  saved = {
    "params": np.ones(3, np.float32),
    "opt": {"schedule": np.array(4, np.int32)},
  }
  writer = checkpoints.RunCheckpointer(tmp_path, every=1, keep=1)
  writer.select(7, saved)
  writer.save(7, saved, {})
  writer.close()
  template = {
    "params": np.ones(3, np.float32),
    "opt": {"count": np.array(0, np.int32)},
  }
  reader = checkpoints.RunCheckpointer(tmp_path, every=1, keep=1)
  with pytest.raises(ValueError, match=r"best/7 holds a state of another"):
    reader.restore_best(template)
  # Nor is the newest state taken for unreadable: falling back to older
  # ones of the same layout, or starting again, would overwrite them.
  with pytest.raises(ValueError, match=r"latest/7 holds a state of another"):
    reader.restore_latest(template)
  reader.close()
  assert (tmp_path / "latest" / "7").is_dir()


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_saves_wait_min_interval_s_but_never_skip_the_last_epoch(tmp_path):
  clock = _Clock()
  writer = checkpoints.RunCheckpointer(
    tmp_path, every=2, keep=1, min_interval_s=60.0, clock=clock
  )
  assert not writer.due(1, 9)  # Every 2 epochs, but 0 s since the start.
  assert writer.due(9, 9)  # The last epoch, whatever the clock.
  clock.now = 61.0
  assert writer.due(1, 9) and not writer.due(2, 9)
  writer.save(1, {"w": np.zeros(2, np.float32)}, {})
  clock.now = 100.0  # 39 s after that save.
  assert not writer.due(3, 9)
  clock.now = 121.0
  assert writer.due(3, 9)
  writer.close()
  for bad in (-1.0, float("nan")):
    with pytest.raises(ValueError, match=r"min_interval_s=.* must be >= 0"):
      checkpoints.RunCheckpointer(tmp_path, every=2, keep=1, min_interval_s=bad)


def _state(value):
  return {"w": np.full(3, value, np.float32)}


def test_the_selected_state_is_written_with_the_next_save(tmp_path):
  writer = checkpoints.RunCheckpointer(tmp_path, every=1, keep=3)
  writer.select(2, _state(2))
  writer.select(3, _state(3))
  assert not list((tmp_path / "best").glob("*"))  # Nothing written yet.
  writer.save(4, _state(4), {"times": []})
  writer.select(6, _state(6))
  writer.save(7, _state(7), {"times": []})
  writer.save(9, _state(9), {"times": []})  # No new selection.
  writer.close()
  assert sorted(int(p.name) for p in (tmp_path / "best").iterdir()) == [3, 6]
  reader = checkpoints.RunCheckpointer(tmp_path, every=1, keep=3)
  epoch, state, progress = reader.restore_latest(_state(0))
  assert (epoch, progress["best_epoch"]) == (9, 6)
  np.testing.assert_array_equal(state["w"], 9)
  np.testing.assert_array_equal(reader.restore_best(_state(0))["w"], 6)
  reader.close()


def test_a_save_killed_between_its_two_writes_resumes_its_selection(
  tmp_path,
):
  writer = checkpoints.RunCheckpointer(tmp_path, every=1, keep=3)
  writer.select(3, _state(3))
  writer.save(4, _state(4), {"times": []})
  writer.select(8, _state(8))
  writer.save(9, _state(9), {"times": []})
  writer.close()
  # Killed after writing best/8, before latest/9.
  _remove(tmp_path / "latest" / "9")
  reader = checkpoints.RunCheckpointer(tmp_path, every=1, keep=3)
  epoch, _, progress = reader.restore_latest(_state(0))
  assert (epoch, progress["best_epoch"]) == (4, 3)
  np.testing.assert_array_equal(reader.restore_best(_state(0))["w"], 3)
  # The selection of the abandoned epochs is gone, not read as the newest.
  assert sorted(int(p.name) for p in (tmp_path / "best").iterdir()) == [3]
  reader.close()


def test_a_resume_may_change_how_often_checkpoints_are_written(
  data_dir, tmp_path, clean_mutag
):
  clean, _ = clean_mutag
  workdir = tmp_path / "b"
  lorap_jax.train_and_evaluate(_mutag_config(data_dir), workdir)
  _forget_the_end(workdir, "fold_0_seed_0", [5])
  config = _mutag_config(data_dir)
  config.checkpoint.every, config.checkpoint.min_interval_s = 3, 30.0
  resumed = lorap_jax.train_and_evaluate(config, workdir, resume=True)
  _assert_same_results(resumed, clean)
