"""An on-disk cache of arrays for datasets that are computed, not read.

MNIST superpixel graphs take minutes to build from the raw images, so they
are built once and kept as an ``.npz`` file. The cache directory is, in
order of precedence: the ``cache_dir`` argument, the ``LORAP_CACHE_DIR``
environment variable, and ``$XDG_CACHE_HOME/lorap_jax``
(``~/.cache/lorap_jax``). It is never chosen inside the data directory by
default: that directory may be shared, checksummed or read-only (pass
``cache_dir=<data dir>/cache`` to keep the cache beside the data).

Every file stores the parameters it was built with; a file whose parameters
differ, or that cannot be read (truncated, corrupt), is rebuilt. Files are
written to a temporary name in the same directory and renamed into place
with `os.replace`, so a reader never sees a partly written file and an
interrupted build leaves nothing under the final name.
"""

import json
import logging
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

CACHE_DIR_ENV = "LORAP_CACHE_DIR"
# The key of the stored parameters inside a cache file.
_PARAMS_KEY = "__params__"

_log = logging.getLogger(__name__)


def _writable_dir(path: pathlib.Path) -> bool:
  """Whether `path` is (or can be created as) a writable directory."""
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return False
  return os.access(path, os.W_OK | os.X_OK)


def resolve_cache_dir(
  cache_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
  """Returns the directory that computed datasets are cached in (created).

  Args:
    cache_dir: The cache directory, or None (or empty) for the
      ``LORAP_CACHE_DIR`` environment variable, then
      ``$XDG_CACHE_HOME/lorap_jax`` (``~/.cache/lorap_jax``).

  Returns:
    An existing, writable directory.

  Raises:
    OSError: If an explicitly given directory cannot be created or written.
  """
  for explicit in (cache_dir, os.environ.get(CACHE_DIR_ENV)):
    if explicit is not None and os.fspath(explicit):
      path = pathlib.Path(explicit).expanduser()
      if not _writable_dir(path):
        raise OSError(
          f"The cache directory {path.absolute()} cannot be created or "
          f"written; pass another cache_dir or set {CACHE_DIR_ENV}."
        )
      return path
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  path = pathlib.Path(base) / "lorap_jax"
  if not _writable_dir(path):
    raise OSError(
      f"No writable cache directory: {path.absolute()} cannot be created or "
      f"written; pass cache_dir or set {CACHE_DIR_ENV}."
    )
  return path


def load_arrays(
  path: pathlib.Path, params: Mapping[str, Any]
) -> dict[str, np.ndarray] | None:
  """Reads a cache file if it was built with `params`.

  Args:
    path: The cache file.
    params: The build parameters (JSON-serialisable); they must equal the
      stored ones.

  Returns:
    The stored arrays, or None if the file is missing, unreadable, or was
    built with other parameters.
  """
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as stored:
      stored_params = json.loads(str(stored[_PARAMS_KEY]))
      if stored_params != json.loads(json.dumps(dict(params))):
        _log.warning("Rebuilding %s: built with other parameters.", path)
        return None
      return {key: stored[key] for key in stored.files if key != _PARAMS_KEY}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    _log.warning("Rebuilding %s: cannot read it (%r).", path, e)
    return None


def save_arrays(
  path: pathlib.Path,
  arrays: Mapping[str, np.ndarray],
  params: Mapping[str, Any],
) -> None:
  """Writes arrays and their build parameters to `path`, atomically.

  Args:
    path: The cache file; its directory must exist.
    arrays: The arrays to store (no object arrays).
    params: The build parameters (JSON-serialisable).
  """
  handle, temporary = tempfile.mkstemp(
    dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
  )
  try:
    with os.fdopen(handle, "wb") as f:
      np.savez_compressed(
        f, **arrays, **{_PARAMS_KEY: np.array(json.dumps(dict(params)))}
      )
    os.replace(temporary, path)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise
