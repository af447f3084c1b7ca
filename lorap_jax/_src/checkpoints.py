"""Orbax checkpoints of a training run: periodic, best, and resumable.

Each run (a seed, or a fold x seed) gets a directory under
``<workdir>/checkpoints/`` with

* ``latest/<epoch>``: the `TrainState` and the loop's progress (selected
  epoch and metrics, epoch times, the shuffling generator's state) every
  few epochs; the last `keep` are kept;
* ``best/<epoch>``: the state at the validation-selected epoch;
* ``record.json``: written when the run has finished.

A checkpoint that cannot be read (an interrupted write, a truncated file)
is skipped with a warning, falling back to the previous one.
"""

import json
import pathlib
import warnings
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

RECORD = "record.json"


def _manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    # Synchronous: a checkpoint exists on disk once `save` returns, so a
    # killed process never loses one it reported.
    enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(directory.absolute(), options=options)


class RunCheckpointer:
  """The checkpoints of one run.

  Attributes:
    directory: the run's checkpoint directory.
    every: save the latest state every this many epochs (and at the end).
  """

  def __init__(self, directory: pathlib.Path, *, every: int, keep: int):
    if every < 1 or keep < 1:
      raise ValueError(
        f"checkpoint.every={every} and checkpoint.keep={keep} must be >= 1"
      )
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self._latest = _manager(self.directory / "latest", keep)
    self._best = _manager(self.directory / "best", 1)

  def due(self, epoch: int, last_epoch: int) -> bool:
    return (epoch + 1) % self.every == 0 or epoch == last_epoch

  def save(self, epoch: int, state, progress: dict[str, Any]) -> None:
    self._latest.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(progress),
      ),
    )

  def save_best(self, epoch: int, state) -> None:
    self._best.save(
      epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state))
    )

  def restore_latest(self, template) -> tuple[int, Any, dict] | None:
    """The newest readable (epoch, state, progress), or None if none."""
    for epoch in sorted(self._latest.all_steps(), reverse=True):
      try:
        restored = self._latest.restore(
          epoch,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template),
            progress=ocp.args.JsonRestore(),
          ),
        )
      # Any failure to read means the checkpoint is unusable.
      except Exception as error:
        warnings.warn(
          f"checkpoint {self.directory / 'latest' / str(epoch)} is "
          f"unreadable ({type(error).__name__}: {error}); falling back to "
          "the previous one",
          stacklevel=2,
        )
        continue
      return epoch, restored.state, restored.progress
    return None

  def restore_best(self, template):
    epoch = self._best.latest_step()
    if epoch is None:
      return None
    try:
      restored = self._best.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(template)),
      )
    except ValueError as error:
      if "structures do not match" not in str(error):
        raise
      raise ValueError(
        f"the checkpoint {self.directory / 'best' / str(epoch)} holds a "
        "state of another layout than this run's model and optimizer: "
        "another config, or lorap_jax before 2026-12-04, when a step "
        "decay moved into the optimizer's state. Resume it with the code "
        "and config that wrote it, or train into a new workdir."
      ) from error
    return restored.state

  def latest_epoch(self) -> int | None:
    return self._latest.latest_step()

  def finish(self, record: dict[str, Any]) -> None:
    path = self.directory / RECORD
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(path)  # Atomic: a record is whole or absent.

  def finished_record(self) -> dict[str, Any] | None:
    path = self.directory / RECORD
    return json.loads(path.read_text()) if path.exists() else None

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def restore_selected(run_directory: pathlib.Path, template) -> Any:
  """The validation-selected state of a finished run, read only.

  Nothing is created or changed under `run_directory` (another run's
  directory, e.g. the source of `post_train_prompts`).

  Raises:
    ValueError: if the run has no selected state there, or it does not
      match `template`.
  """
  best = pathlib.Path(run_directory).absolute() / "best"
  if not best.is_dir():
    raise ValueError(f"no selected state (best/) in {run_directory}")
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  with ocp.CheckpointManager(best, options=options) as manager:
    epoch = manager.latest_step()
    if epoch is None:
      raise ValueError(f"no selected state (best/) in {run_directory}")
    # Checked on the metadata first: a restore that fails half-way leaves
    # open tensorstore handles behind.
    _check_fits(best / str(epoch), template)
    restored = manager.restore(
      epoch,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(template)),
    )
  return restored.state


def _check_fits(step_directory: pathlib.Path, template) -> None:
  """Raises ValueError unless the saved state has `template`'s variables
  (names and shapes)."""
  metadata = ocp.StandardCheckpointer().metadata(step_directory / "state")
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  saved = {
    jax.tree_util.keystr(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
  wanted = {
    jax.tree_util.keystr(path): tuple(np.shape(leaf))
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      flax.serialization.to_state_dict(template)
    )
  }
  # The model's variables, plain nested dicts in both trees (optimizer
  # states name their tuples differently in orbax's metadata).
  variables = ("['params']", "['quant_stats']", "['batch_stats']")
  for name in sorted(saved.keys() | wanted.keys()):
    if name.startswith(variables) and saved.get(name) != wanted.get(name):
      raise ValueError(
        f"the selected state in {step_directory} does not fit this model: "
        f"{name} is {saved.get(name, 'absent')} there, "
        f"{wanted.get(name, 'absent')} here"
      )
