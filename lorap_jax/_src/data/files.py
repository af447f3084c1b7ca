"""Finding dataset files on disk and checking that they are intact.

The datasets live in a local data directory given by the ``--data-dir`` flag
or the ``LORAP_DATA_DIR`` environment variable; nothing is downloaded unless
asked for (``lorap train --download`` or `download.fetch_dataset`). Files
whose relative path is listed in ``checksums.json`` are checked against their
SHA-256 digest the first time they are used in a process.
"""

import functools
import hashlib
import importlib.resources
import json
import os
import pathlib

DATA_DIR_ENV = "LORAP_DATA_DIR"

_EXPECTED_LAYOUT = (
  "planetoid/<name>/ind.<name>.*, gin/<NAME>/<NAME>.txt, "
  "tu/<NAME>/<NAME>_*.txt, npz/<file>.npz, mnist/raw/*-ubyte.gz and "
  "aqsol/"
)
_HOW_TO_GIVE = f"pass --data-dir or set the {DATA_DIR_ENV} environment variable"

# Absolute path -> (size, mtime_ns) of files whose digest already matched, so
# that each file is hashed at most once per process.
_VERIFIED_FILES: dict[pathlib.Path, tuple[int, int]] = {}


# Data directories that `download.fetch_dataset` can fill from a public source.
_DOWNLOADABLE = ("planetoid/", "tu/")
_HOW_TO_DOWNLOAD = (
  " The Planetoid and TU sets can be fetched from their public source with "
  "`lorap train --download` or `lorap_jax.fetch_dataset(name, data_dir)`."
)


class DatasetError(ValueError):
  """A dataset's arrays are inconsistent, out of range or not finite."""


class DataFileError(DatasetError):
  """A dataset file exists but is corrupt, truncated or malformed."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """Returns the data directory to load datasets from.

  Args:
    data_dir: The directory, or None (or empty) to use the ``LORAP_DATA_DIR``
      environment variable.

  Returns:
    The data directory, which exists.

  Raises:
    FileNotFoundError: If no directory was given and the environment variable
      is unset or empty, or if the directory does not exist.
  """
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV)
  # An empty value would silently mean the current directory.
  if data_dir is None or not os.fspath(data_dir):
    raise FileNotFoundError(
      f"No data directory was given: {_HOW_TO_GIVE}. It must hold the "
      f"layout {_EXPECTED_LAYOUT}."
    )
  path = pathlib.Path(data_dir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(
      f"The data directory {path.absolute()} does not exist (or is not a "
      f"directory); {_HOW_TO_GIVE} to a directory with the layout "
      f"{_EXPECTED_LAYOUT}." + _HOW_TO_DOWNLOAD
    )
  return path


@functools.cache
def _known_checksums() -> dict[str, str]:
  """Returns the packaged map of relative data path -> SHA-256 hex digest."""
  text = (
    importlib.resources.files(__package__)
    .joinpath("checksums.json")
    .read_text(encoding="utf-8")
  )
  return json.loads(text)


def _sha256_of(path: pathlib.Path) -> str:
  """Returns the SHA-256 hex digest of a file's content."""
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _verify_checksum(path: pathlib.Path, relative: str, expected: str) -> None:
  """Hashes `path` unless it is unchanged since it last matched `expected`."""
  stat = path.stat()
  key = path.resolve()
  fingerprint = (stat.st_size, stat.st_mtime_ns)
  if _VERIFIED_FILES.get(key) == fingerprint:
    return
  actual = _sha256_of(path)
  if actual != expected:
    raise DataFileError(
      f"Dataset file {relative} at {path.absolute()} has SHA-256 {actual}, "
      f"expected {expected}: the file is corrupt or a different version; "
      "replace it."
    )
  _VERIFIED_FILES[key] = fingerprint


def require_file(data_dir: pathlib.Path, relative: str) -> pathlib.Path:
  """Returns the path of a dataset file after checking that it is usable.

  Args:
    data_dir: The data directory (see `resolve_data_dir`).
    relative: The file's path inside the data directory, with forward
      slashes, e.g. ``"planetoid/cora/ind.cora.x"``.

  Returns:
    ``data_dir / relative``.

  Raises:
    FileNotFoundError: If the file does not exist.
    DataFileError: If the file is listed in ``checksums.json`` and its
      SHA-256 digest differs from the listed one.
  """
  path = pathlib.Path(data_dir) / relative
  if not path.is_file():
    raise FileNotFoundError(
      f"Dataset file {relative} is missing: expected it at "
      f"{path.absolute()}. Point --data-dir or {DATA_DIR_ENV} at a directory "
      f"with the layout {_EXPECTED_LAYOUT}."
      + (_HOW_TO_DOWNLOAD if relative.startswith(_DOWNLOADABLE) else "")
    )
  expected = _known_checksums().get(relative)
  if expected is not None:
    _verify_checksum(path, relative, expected)
  return path
