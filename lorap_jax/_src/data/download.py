"""Opt-in download of the Planetoid and TU sets from their public sources.

Nothing is downloaded unless asked for (`fetch_dataset`, or ``lorap train
--download``). Every file is streamed into a temporary file beside its
destination, checked against the ``Content-Length`` the server announced
and, where ``checksums.json`` lists it, against its SHA-256 digest, and only
then renamed into place with `os.replace`. An interrupted, truncated or
corrupt download therefore never leaves a file under the final name, and a
file already there is only ever replaced by a verified one.

Sources:

* Planetoid: ``ind.<name>.<suffix>`` from the ``data/`` folder of
  ``kimiyoung/planetoid``, the files Kipf & Welling's GCN code and PyG load;
  every file has a listed digest.
* TU: ``<NAME>.zip`` from the TUDataset server. The archive has no listed
  digest, so its size is checked while it streams and the extracted files
  are checked against the digests listed for ``tu/<NAME>/``; they are
  extracted into a temporary folder that is renamed into place.

GIN-format sets have no canonical download; they must be placed by hand.
"""

import hashlib
import http.client
import os
import pathlib
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

from lorap_jax._src.data import datasets, files

PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
TU_URL = "https://www.chrsmrrs.com/graphkerneldatasets"

_CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
  """A download failed, was truncated or did not match its checksum.

  Nothing is left under the destination name when this is raised; a file
  already there is untouched.
  """


def _temporary_path(destination: pathlib.Path) -> pathlib.Path:
  """A fresh hidden name beside `destination`, so `os.replace` is atomic."""
  token = secrets.token_hex(4)
  return destination.with_name(f".{destination.name}.{token}.part")


def _stream(
  url: str, out, timeout: float, destination: pathlib.Path
) -> tuple[str, int, int | None]:
  """Copies `url` into the open file `out`.

  Returns:
    ``(sha256 hex digest, bytes received, Content-Length or None)``.

  Raises:
    DownloadError: On an HTTP error status, a connection error or timeout.
  """
  digest = hashlib.sha256()
  received = 0
  request = urllib.request.Request(url, headers={"User-Agent": "lorap_jax"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      length = response.headers.get("Content-Length")
      expected = int(length) if length and length.isdigit() else None
      while chunk := response.read(_CHUNK_BYTES):
        digest.update(chunk)
        out.write(chunk)
        received += len(chunk)
  except urllib.error.HTTPError as error:
    raise DownloadError(
      f"Download of {url} failed: HTTP {error.code} {error.reason}. Nothing "
      f"was written to {destination}."
    ) from error
  except (
    urllib.error.URLError,  # no connection, refused, DNS
    http.client.HTTPException,  # IncompleteRead, malformed responses
    OSError,  # resets, timeouts, RemoteDisconnected
    ValueError,  # a malformed URL
  ) as error:
    reason = getattr(error, "reason", None) or error
    raise DownloadError(
      f"Download of {url} failed after {received} bytes: {reason!r}. "
      f"Nothing was written to {destination}."
    ) from error
  return digest.hexdigest(), received, expected


def download_file(
  url: str,
  destination: str | os.PathLike,
  sha256: str | None,
  *,
  timeout: float = 60.0,
) -> pathlib.Path:
  """Downloads `url` to `destination` atomically, verifying what arrives.

  The bytes go to a temporary file in the destination's folder; it is
  renamed to `destination` only once the size matches the server's
  ``Content-Length`` and, when given, the SHA-256 digest matches `sha256`.
  On any failure (HTTP error, connection error, truncation, mismatch,
  interruption) the temporary file is removed and an existing destination
  is left as it was.

  Args:
    url: The source, ``http://`` or ``https://``.
    destination: The final path; missing parent folders are created.
    sha256: The expected hex SHA-256 digest, or None to check only the size.
    timeout: Seconds to wait for the connection and each read.

  Returns:
    `destination`, as a path.

  Raises:
    DownloadError: If the download fails or does not verify; the message
      says what was expected and what arrived.
  """
  destination = pathlib.Path(destination)
  temporary = _temporary_path(destination)
  try:
    destination.parent.mkdir(parents=True, exist_ok=True)
    # "x": never reuse a file; permissions follow the umask like any file.
    out = temporary.open("xb")
  except OSError as error:
    raise DownloadError(
      f"Cannot write the download of {url} into {destination.parent}: {error}."
    ) from error
  try:
    with out:
      actual, received, expected = _stream(url, out, timeout, destination)
      out.flush()
      os.fsync(out.fileno())
    if expected is not None and received != expected:
      raise DownloadError(
        f"Download of {url} was truncated: received {received} of "
        f"{expected} bytes (Content-Length). Nothing was written to "
        f"{destination}."
      )
    if sha256 is not None and actual != sha256.lower():
      raise DownloadError(
        f"Download of {url} is corrupt or a different version: its SHA-256 "
        f"is {actual}, expected {sha256} ({received} bytes received). "
        f"Nothing was written to {destination}."
      )
    os.replace(temporary, destination)
  except BaseException:  # Including KeyboardInterrupt: never leave a part.
    temporary.unlink(missing_ok=True)
    raise
  return destination


def _is_present(data_dir: pathlib.Path, relative: str) -> bool:
  """Whether a data file exists and matches its listed digest, if any."""
  path = data_dir / relative
  if not path.is_file():
    return False
  expected = files._known_checksums().get(relative)
  if expected is None:
    return True
  try:
    files._verify_checksum(path, relative, expected)
  except files.DataFileError:
    return False  # Replaced below, by a verified download only.
  return True


def _fetch_planetoid(
  name: str, data_dir: pathlib.Path, base_url: str, timeout: float
) -> list[pathlib.Path]:
  """Downloads the missing or damaged ``planetoid/<name>/`` files."""
  written = []
  for suffix in datasets.PLANETOID_SUFFIXES:
    relative = f"planetoid/{name}/ind.{name}.{suffix}"
    if _is_present(data_dir, relative):
      continue
    written.append(
      download_file(
        f"{base_url}/ind.{name}.{suffix}",
        data_dir / relative,
        files._known_checksums()[relative],
        timeout=timeout,
      )
    )
  return written


def _extract(archive: pathlib.Path, url: str, folder: pathlib.Path) -> None:
  """Extracts the files of a zip archive flat into `folder`.

  Only base names are used, so no member can write outside `folder`;
  macOS resource forks are skipped.

  Raises:
    DownloadError: If the archive is not a readable zip (zipfile checks
      every member's CRC while reading).
  """
  folder.mkdir()
  try:
    with zipfile.ZipFile(archive) as zipped:
      for member in zipped.infolist():
        name = pathlib.PurePosixPath(member.filename)
        if member.is_dir() or "__MACOSX" in name.parts:
          continue
        if name.name.startswith("._") or name.name in ("", ".", ".."):
          continue
        with zipped.open(member) as src, (folder / name.name).open("wb") as dst:
          shutil.copyfileobj(src, dst, _CHUNK_BYTES)
  except (zipfile.BadZipFile, EOFError, OSError) as error:
    raise DownloadError(
      f"The archive downloaded from {url} cannot be extracted: {error!r}. "
      "Nothing was installed."
    ) from error


def _verify_extracted(folder: pathlib.Path, directory: str, url: str) -> None:
  """Checks that the loader's files are there and every listed digest.

  Raises:
    DownloadError: Naming the missing or mismatching file.
  """
  checksums = files._known_checksums()
  for part in datasets.TU_PARTS:
    name = f"{directory}_{part}.txt"
    if not (folder / name).is_file():
      raise DownloadError(
        f"The archive downloaded from {url} lacks {name}. Nothing was "
        "installed."
      )
  for path in sorted(folder.iterdir()):
    expected = checksums.get(f"tu/{directory}/{path.name}")
    if expected is None:
      continue
    actual = files._sha256_of(path)
    if actual != expected:
      raise DownloadError(
        f"{path.name} in the archive downloaded from {url} has SHA-256 "
        f"{actual}, expected {expected}: a corrupt or different version. "
        "Nothing was installed."
      )


def _install(folder: pathlib.Path, target: pathlib.Path) -> list[pathlib.Path]:
  """Moves verified files into `target`: one rename, or one per file."""
  names = sorted(path.name for path in folder.iterdir())
  try:
    os.rename(folder, target)  # Atomic when target does not exist yet.
  except OSError:
    # The folder exists (some files are present): each file is verified,
    # so replacing them one by one never exposes a partial file.
    for name in names:
      os.replace(folder / name, target / name)
  return [target / name for name in names]


def _fetch_tu(
  directory: str, data_dir: pathlib.Path, base_url: str, timeout: float
) -> list[pathlib.Path]:
  """Downloads and installs ``tu/<NAME>/`` unless its files are present."""
  required = [
    f"tu/{directory}/{directory}_{part}.txt" for part in datasets.TU_PARTS
  ]
  if all(_is_present(data_dir, relative) for relative in required):
    return []
  tu_dir = data_dir / "tu"
  tu_dir.mkdir(parents=True, exist_ok=True)
  url = f"{base_url}/{directory}.zip"
  staging = pathlib.Path(
    tempfile.mkdtemp(prefix=f".{directory}.", suffix=".part", dir=tu_dir)
  )
  try:
    archive = download_file(
      url, staging / f"{directory}.zip", None, timeout=timeout
    )
    extracted = staging / directory
    _extract(archive, url, extracted)
    _verify_extracted(extracted, directory, url)
    return _install(extracted, tu_dir / directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _data_dir_to_fill(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """The data directory, created if needed (unlike `resolve_data_dir`)."""
  if data_dir is None:
    data_dir = os.environ.get(files.DATA_DIR_ENV)
  if data_dir is None or not os.fspath(data_dir):
    return files.resolve_data_dir(None)  # Raises, explaining what to set.
  path = pathlib.Path(data_dir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise FileNotFoundError(
      f"The data directory {path.absolute()} cannot be created: {error}."
    ) from error
  return path


def fetch_dataset(
  name: str,
  data_dir: str | os.PathLike | None = None,
  *,
  base_url: str | None = None,
  timeout: float = 60.0,
) -> list[pathlib.Path]:
  """Downloads a Planetoid or TU dataset into the data directory.

  Files that are present and match their listed digest are kept; missing
  or damaged ones are downloaded (see `download_file`), so calling this
  before every run costs one hash per file.

  Args:
    name: ``cora``, ``citeseer``, ``pubmed``, ``tu-mutag``, ``tu-proteins``
      or ``tu-nci1`` (any case).
    data_dir: The data directory (created if missing), or None for
      ``LORAP_DATA_DIR``.
    base_url: Where to download from instead of the public source (a
      mirror): the folder of ``ind.<name>.<suffix>`` for Planetoid, of
      ``<NAME>.zip`` for TU.
    timeout: Seconds to wait for each connection and read.

  Returns:
    The files written, empty when everything was already present.

  Raises:
    ValueError: If `name` is unknown or has no public download (the GIN
      format sets).
    FileNotFoundError: If no data directory is given.
    DownloadError: If a download fails or does not verify.
  """
  key = name.lower()
  if key in datasets._PLANETOID_NAMES:
    data_dir = _data_dir_to_fill(data_dir)
    base_url = (base_url or PLANETOID_URL).rstrip("/")
    return _fetch_planetoid(key, data_dir, base_url, timeout)
  if key in datasets._TU_DIRS:
    data_dir = _data_dir_to_fill(data_dir)
    base_url = (base_url or TU_URL).rstrip("/")
    return _fetch_tu(datasets._TU_DIRS[key], data_dir, base_url, timeout)
  if key in datasets._GIN_DIRS:
    tu_names = [n for n, d in datasets._TU_DIRS.items() if d.lower() == key]
    alternative = f" (use {tu_names[0]!r}, the TU copy)" if tu_names else ""
    raise ValueError(
      f"{name!r} is a GIN-format dataset, which has no canonical download"
      f"{alternative}; place its files under gin/ in the data directory."
    )
  raise ValueError(
    f"Unknown dataset {name!r}; downloadable datasets: "
    f"{', '.join((*datasets._PLANETOID_NAMES, *datasets._TU_DIRS))}."
  )
