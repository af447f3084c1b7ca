"""Orbax checkpoints of a training run: periodic, best, and resumable.

Each run (a seed, or a fold x seed) gets a directory under
``<workdir>/checkpoints/`` with

* ``latest/<epoch>``: the `TrainState` and the loop's progress (selected
  epoch and metrics, epoch times, the shuffling generator's state) every
  few epochs; the last `keep` are kept;
* ``best/<epoch>``: the state at the validation-selected epoch, written
  with the latest state that follows its selection (the newest `keep + 1`
  kept, so that each latest state's selection is there);
* ``record.json``: written when the run has finished.

Saves cost far more than the epochs of a small model (orbax writes each of
a state's arrays on its own: 3.7 s for a MixQ GIN's 1,877 on one core), so a
periodic save waits at least `min_interval_s` after the previous one, and
the selected state is written only with a periodic save, not at every
selection. A run killed in between repeats its last epochs on resume.

A checkpoint that cannot be read (an interrupted write, a truncated file)
is skipped with a warning, falling back to the previous one.
"""

import json
import pathlib
import time
import warnings
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
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
    min_interval_s: but not sooner than this many seconds after the
      previous save (the last epoch is saved regardless).
  """

  def __init__(
    self,
    directory: pathlib.Path,
    *,
    every: int,
    keep: int,
    min_interval_s: float = 0.0,
    clock=time.monotonic,
  ):
    if every < 1 or keep < 1:
      raise ValueError(
        f"checkpoint.every={every} and checkpoint.keep={keep} must be >= 1"
      )
    if not min_interval_s >= 0:  # NaN too.
      raise ValueError(
        f"checkpoint.min_interval_s={min_interval_s} must be >= 0 seconds"
      )
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self.min_interval_s = min_interval_s
    self._clock = clock
    self._last_save = clock()
    self._latest = _manager(self.directory / "latest", keep)
    # A save writes at most one selected state, so `keep + 1` hold the one
    # every kept latest state names, even after a save killed between them.
    self._best = _manager(self.directory / "best", keep + 1)
    self._best_epoch = self._best.latest_step()
    self._unsaved_best = None

  def due(self, epoch: int, last_epoch: int) -> bool:
    if epoch == last_epoch:
      return True
    waited = self._clock() - self._last_save
    return (epoch + 1) % self.every == 0 and waited >= self.min_interval_s

  def select(self, epoch: int, state) -> None:
    """Notes the validation-selected state; the next `save` writes it."""
    self._unsaved_best = (epoch, state)

  def save(self, epoch: int, state, progress: dict[str, Any]) -> None:
    """Writes the state selected since the last save, then `state` and
    `progress` (with the selected state's epoch, which a resume reads)."""
    if self._unsaved_best is not None:
      self._best_epoch, selected = self._unsaved_best
      self._best.save(
        self._best_epoch,
        args=ocp.args.Composite(state=ocp.args.StandardSave(selected)),
      )
      self._unsaved_best = None
    progress = {**progress, "best_epoch": self._best_epoch}
    self._latest.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(progress),
      ),
    )
    self._last_save = self._clock()

  def restore_latest(self, template) -> tuple[int, Any, dict] | None:
    """The newest readable (epoch, state, progress), or None if none.

    Selected states saved after it (a save killed before its latest
    state) are deleted: `restore_best` returns the one its progress names.
    """
    for epoch in sorted(self._latest.all_steps(), reverse=True):
      try:
        restored = self._latest.restore(
          epoch,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template),
            progress=ocp.args.JsonRestore(),
          ),
        )
      # Any failure to read means the checkpoint is unusable, but one of
      # another layout is whole: an older one would be too, and starting
      # the run again would overwrite them.
      except Exception as error:
        if _is_another_layout(error):
          path = self.directory / "latest" / str(epoch)
          raise _another_layout(path) from error
        warnings.warn(
          f"checkpoint {self.directory / 'latest' / str(epoch)} is "
          f"unreadable ({type(error).__name__}: {error}); falling back to "
          "the previous one",
          stacklevel=2,
        )
        continue
      self._forget_selections_after(restored.progress)
      return epoch, placed_as(restored.state, template), restored.progress
    return None

  def _forget_selections_after(self, progress: dict[str, Any]) -> None:
    # Checkpoints before 2026-12-06 name none: their newest is the one.
    named = progress.get("best_epoch", self._best.latest_step())
    if named is not None:
      for epoch in self._best.all_steps():
        if epoch > named:
          self._best.delete(epoch)
    self._best_epoch = named

  def restore_best(self, template):
    """The selected state the restored progress names (without one, the
    newest), or None if none was saved."""
    epoch = self._best_epoch
    if epoch not in self._best.all_steps():
      if epoch is not None:
        warnings.warn(
          f"the selected state of epoch {epoch} is gone from "
          f"{self.directory / 'best'}; using the newest there",
          stacklevel=2,
        )
      epoch = self._best.latest_step()
    if epoch is None:
      return None
    try:
      restored = self._best.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(template)),
      )
    except ValueError as error:
      if not _is_another_layout(error):
        raise
      raise _another_layout(self.directory / "best" / str(epoch)) from error
    return placed_as(restored.state, template)

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


def _is_another_layout(error: Exception) -> bool:
  return isinstance(error, ValueError) and "structures do not match" in str(
    error
  )


def _another_layout(path: pathlib.Path) -> ValueError:
  return ValueError(
    f"the checkpoint {path} holds a state of another layout than this "
    "run's model and optimizer: another config, or lorap_jax before "
    "2026-12-04, when a step decay moved into the optimizer's state, or "
    "before 2026-12-06 for MixQ's fixed stage, whose widths moved into the "
    "quantizers' state. Resume it with the code and config that wrote it, "
    "or train into a new workdir."
  )


def run_checkpointer(directory: pathlib.Path, settings) -> RunCheckpointer:
  """A `RunCheckpointer` with a config's `checkpoint` settings."""
  return RunCheckpointer(
    directory,
    every=settings.every,
    keep=settings.keep,
    min_interval_s=settings.min_interval_s,
  )


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
  return placed_as(restored.state, template)


def placed_as(restored, template):
  """`restored` with each array left to JAX's default placement where the
  template's was.

  Orbax returns arrays committed to their device. jit compiles a committed
  argument apart from an uncommitted one of the same shape, so without this
  a run resumed in the process that trained (a notebook, the tests)
  compiled every step again. Arrays the template commits (a sharded
  state), and PRNG keys, are kept as restored.
  """

  def place(saved, like):
    if (
      isinstance(saved, jax.Array)
      and isinstance(like, jax.Array)
      and saved.committed
      and not like.committed
      and not jax.dtypes.issubdtype(saved.dtype, jax.dtypes.extended)
    ):
      return jnp.asarray(np.asarray(saved))
    return saved

  return jax.tree.map(place, restored, template)


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
