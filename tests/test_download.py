"""Downloads against a local HTTP server on 127.0.0.1 (no internet needed).

The server serves the real Cora and MUTAG files from the data directory, a
copy with one byte flipped, responses that stop half-way through their
announced Content-Length, and 404s.
"""

import http.server
import io
import os
import pathlib
import re
import socket
import threading
import zipfile
from typing import ClassVar

import pytest

import lorap_jax
from lorap_jax._src import cli
from lorap_jax._src.data import download, files

CORA_SUFFIXES = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")


def _flip_one_byte(content: bytes) -> bytes:
  corrupted = bytearray(content)
  corrupted[len(corrupted) // 2] ^= 0xFF
  return bytes(corrupted)


def _zip_folder(folder: pathlib.Path, edit=None) -> bytes:
  """A zip of `folder` as ``<NAME>/<file>``, the TUDataset server's layout."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
    for path in sorted(folder.iterdir()):
      content = path.read_bytes()
      if edit is not None:
        content = edit(path.name, content)
      archive.writestr(f"{folder.name}/{path.name}", content)
  return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `routes`: path -> (bytes, "ok" | "truncated")."""

  routes: ClassVar[dict[str, tuple[bytes, str]]] = {}

  def do_GET(self):
    route = self.routes.get(self.path)
    if route is None:
      self.send_error(404, "Not Found")
      return
    content, mode = route
    self.send_response(200)
    self.send_header("Content-Type", "application/octet-stream")
    self.send_header("Content-Length", str(len(content)))
    self.end_headers()
    if mode == "truncated":
      # Announce everything, send half, then close the connection.
      self.wfile.write(content[: len(content) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(content)

  def log_message(self, format, *args):
    pass  # Keep the test output clean.


@pytest.fixture(scope="module")
def server(data_dir):
  """Base URL of a local server with good, corrupt and truncated copies."""
  routes = {}
  cora = data_dir / "planetoid" / "cora"
  for suffix in CORA_SUFFIXES:
    name = f"ind.cora.{suffix}"
    content = (cora / name).read_bytes()
    routes[f"/good/{name}"] = (content, "ok")
    routes[f"/corrupt/{name}"] = (_flip_one_byte(content), "ok")
    routes[f"/truncated/{name}"] = (content, "truncated")
  mutag = data_dir / "tu" / "MUTAG"
  archive = _zip_folder(mutag)
  routes["/tu/MUTAG.zip"] = (archive, "ok")
  routes["/tu-truncated/MUTAG.zip"] = (archive, "truncated")
  routes["/tu-corrupt/MUTAG.zip"] = (
    _zip_folder(
      mutag,
      lambda name, content: (
        _flip_one_byte(content) if name == "MUTAG_A.txt" else content
      ),
    ),
    "ok",
  )
  routes["/tu-not-a-zip/MUTAG.zip"] = (b"<html>moved</html>", "ok")
  handler = type("Handler", (_Handler,), {"routes": routes})
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def _digest(relative: str) -> str:
  return files._known_checksums()[relative]


def _leftovers(folder: pathlib.Path) -> list[str]:
  """Every file or folder under `folder`, relative, sorted."""
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- download_file -----------------------------------------------------------


def test_download_writes_a_verified_file(server, data_dir, tmp_path):
  destination = tmp_path / "sub" / "ind.cora.x"
  path = lorap_jax.download_file(
    f"{server}/good/ind.cora.x",
    destination,
    _digest("planetoid/cora/ind.cora.x"),
    timeout=5,
  )
  assert path == destination
  expected = (data_dir / "planetoid" / "cora" / "ind.cora.x").read_bytes()
  assert destination.read_bytes() == expected
  assert _leftovers(tmp_path) == ["sub", "sub/ind.cora.x"]
  # Permissions follow the umask, as for any new file (not mkstemp's 0600).
  umask = os.umask(0)
  os.umask(umask)
  assert destination.stat().st_mode & 0o777 == 0o666 & ~umask


def test_corrupt_download_is_refused(server, tmp_path):
  expected = _digest("planetoid/cora/ind.cora.x")
  with pytest.raises(
    lorap_jax.DownloadError,
    match=r"ind\.cora\.x is corrupt or a different version: its SHA-256 is "
    rf"[0-9a-f]{{64}}, expected {expected} \(\d+ bytes received\)\. Nothing "
    r"was written to .*ind\.cora\.x\.",
  ):
    lorap_jax.download_file(
      f"{server}/corrupt/ind.cora.x", tmp_path / "ind.cora.x", expected
    )
  assert _leftovers(tmp_path) == []


def test_truncated_download_is_refused(server, data_dir, tmp_path):
  size = (data_dir / "planetoid" / "cora" / "ind.cora.allx").stat().st_size
  with pytest.raises(
    lorap_jax.DownloadError,
    match=rf"ind\.cora\.allx was truncated: received {size // 2} of {size} "
    r"bytes \(Content-Length\)\. Nothing was written",
  ):
    lorap_jax.download_file(
      f"{server}/truncated/ind.cora.allx",
      tmp_path / "ind.cora.allx",
      _digest("planetoid/cora/ind.cora.allx"),
    )
  assert _leftovers(tmp_path) == []


def test_truncated_download_without_a_digest_is_refused(server, tmp_path):
  with pytest.raises(lorap_jax.DownloadError, match=r"was truncated: received"):
    lorap_jax.download_file(
      f"{server}/truncated/ind.cora.y", tmp_path / "ind.cora.y", None
    )
  assert _leftovers(tmp_path) == []


def test_http_error_is_refused(server, tmp_path):
  with pytest.raises(
    lorap_jax.DownloadError,
    match=r"Download of http://127\.0\.0\.1:\d+/missing/ind\.cora\.x failed: "
    r"HTTP 404 Not Found\. Nothing was written",
  ):
    lorap_jax.download_file(
      f"{server}/missing/ind.cora.x", tmp_path / "ind.cora.x", None
    )
  assert _leftovers(tmp_path) == []


def test_connection_refused(tmp_path):
  with socket.socket() as probe:  # a port that nothing listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  with pytest.raises(
    lorap_jax.DownloadError,
    match=rf"Download of http://127\.0\.0\.1:{port}/x failed after 0 bytes: "
    r"ConnectionRefusedError",
  ):
    lorap_jax.download_file(
      f"http://127.0.0.1:{port}/x", tmp_path / "x", None, timeout=5
    )
  assert _leftovers(tmp_path) == []


def test_failed_download_keeps_the_existing_file(server, data_dir, tmp_path):
  good = (data_dir / "planetoid" / "cora" / "ind.cora.ty").read_bytes()
  destination = tmp_path / "ind.cora.ty"
  destination.write_bytes(good)
  before = destination.stat()
  digest = _digest("planetoid/cora/ind.cora.ty")
  for mode in ("corrupt", "truncated", "missing"):
    with pytest.raises(lorap_jax.DownloadError, match="Nothing was written"):
      lorap_jax.download_file(
        f"{server}/{mode}/ind.cora.ty", destination, digest
      )
  assert destination.read_bytes() == good
  assert destination.stat().st_mtime_ns == before.st_mtime_ns
  assert _leftovers(tmp_path) == ["ind.cora.ty"]


def test_interrupted_download_leaves_nothing(server, tmp_path, monkeypatch):
  def interrupted(url, out, timeout, destination):
    out.write(b"partial")
    raise KeyboardInterrupt

  monkeypatch.setattr(download, "_stream", interrupted)
  with pytest.raises(KeyboardInterrupt):
    lorap_jax.download_file(
      f"{server}/good/ind.cora.x", tmp_path / "ind.cora.x", None
    )
  assert _leftovers(tmp_path) == []


# --- fetch_dataset -----------------------------------------------------------


def test_fetch_planetoid_then_load(server, tmp_path):
  root = tmp_path / "data"  # created by the fetch
  written = lorap_jax.fetch_dataset("Cora", root, base_url=f"{server}/good/")
  assert sorted(p.name for p in written) == sorted(
    f"ind.cora.{s}" for s in CORA_SUFFIXES
  )
  dataset = lorap_jax.load_dataset("cora", root)
  assert dataset.graph.nodes.shape == (2708, 1433)
  assert len(dataset.graph.senders) == 10556
  # Everything present and verified: nothing to do, even from a bad mirror.
  assert lorap_jax.fetch_dataset("cora", root, base_url=f"{server}/bad") == []
  assert _leftovers(root / "planetoid") == ["cora"] + [
    f"cora/ind.cora.{s}" for s in sorted(CORA_SUFFIXES)
  ]


def test_fetch_replaces_only_damaged_files(server, data_dir, tmp_path):
  folder = tmp_path / "planetoid" / "cora"
  folder.mkdir(parents=True)
  for suffix in CORA_SUFFIXES:
    name = f"ind.cora.{suffix}"
    (folder / name).write_bytes(
      (data_dir / "planetoid/cora" / name).read_bytes()
    )
  damaged = folder / "ind.cora.tx"
  damaged.write_bytes(_flip_one_byte(damaged.read_bytes()))
  # A corrupt mirror cannot replace it ...
  with pytest.raises(
    lorap_jax.DownloadError, match=r"ind\.cora\.tx is corrupt"
  ):
    lorap_jax.fetch_dataset("cora", tmp_path, base_url=f"{server}/corrupt")
  with pytest.raises(lorap_jax.DataFileError, match=r"ind\.cora\.tx .*SHA-256"):
    lorap_jax.load_dataset("cora", tmp_path)
  # ... a good one does, and only that file is fetched.
  written = lorap_jax.fetch_dataset("cora", tmp_path, base_url=f"{server}/good")
  assert written == [damaged]
  lorap_jax.load_dataset("cora", tmp_path)


def test_fetch_tu_extracts_and_verifies(server, data_dir, tmp_path):
  written = lorap_jax.fetch_dataset(
    "tu-mutag", tmp_path, base_url=f"{server}/tu"
  )
  expected = sorted(p.name for p in (data_dir / "tu" / "MUTAG").iterdir())
  assert sorted(p.name for p in written) == expected
  assert _leftovers(tmp_path / "tu") == ["MUTAG"] + [
    f"MUTAG/{name}" for name in expected
  ]
  dataset = lorap_jax.load_dataset("tu-mutag", tmp_path)
  assert len(dataset.graphs) == 188
  assert lorap_jax.fetch_dataset("tu-mutag", tmp_path, base_url="unused") == []


def test_fetch_tu_into_a_partial_folder(server, data_dir, tmp_path):
  folder = tmp_path / "tu" / "MUTAG"
  folder.mkdir(parents=True)
  (folder / "notes.txt").write_text("mine")
  (folder / "MUTAG_A.txt").write_text("truncated")
  lorap_jax.fetch_dataset("tu-mutag", tmp_path, base_url=f"{server}/tu")
  assert (folder / "notes.txt").read_text() == "mine"
  assert len(lorap_jax.load_dataset("tu-mutag", tmp_path).graphs) == 188
  assert not list((tmp_path / "tu").glob(".*"))  # no staging folder left


@pytest.mark.parametrize(
  ("route", "message"),
  [
    (
      "tu-corrupt",
      r"MUTAG_A\.txt in the archive downloaded from http://127\.0\.0\.1:\d+/"
      r"tu-corrupt/MUTAG\.zip has SHA-256 [0-9a-f]{64}, expected "
      r"[0-9a-f]{64}: a corrupt or different version\. Nothing was installed",
    ),
    ("tu-truncated", r"MUTAG\.zip was truncated: received \d+ of \d+ bytes"),
    (
      "tu-not-a-zip",
      r"The archive downloaded from .*MUTAG\.zip cannot be extracted: "
      r"BadZipFile",
    ),
    ("tu-missing", r"MUTAG\.zip failed: HTTP 404"),
  ],
)
def test_fetch_tu_refuses_bad_archives(server, tmp_path, route, message):
  with pytest.raises(lorap_jax.DownloadError, match=message):
    lorap_jax.fetch_dataset("tu-mutag", tmp_path, base_url=f"{server}/{route}")
  assert _leftovers(tmp_path) == ["tu"]  # no dataset, no staging folder


def test_fetch_refuses_names_without_a_source(tmp_path):
  with pytest.raises(
    ValueError,
    match=r"'mutag' is a GIN-format dataset, which has no canonical download "
    r"\(use 'tu-mutag', the TU copy\)",
  ):
    lorap_jax.fetch_dataset("mutag", tmp_path)
  with pytest.raises(
    ValueError,
    match=r"Unknown dataset 'qm9'; downloadable datasets: cora, citeseer, "
    r"pubmed, tu-mutag, tu-proteins, tu-nci1",
  ):
    lorap_jax.fetch_dataset("qm9", tmp_path)


def test_cli_download_then_train(server, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(download, "PLANETOID_URL", f"{server}/good")
  common = [
    "train",
    "--dataset=cora",
    f"--data-dir={tmp_path / 'data'}",
    "--no-progress",
  ]
  # Without --download the missing file's message points at the option.
  assert cli.main([*common, f"--workdir={tmp_path / 'a'}"]) == 2
  assert "lorap train --download" in capsys.readouterr().err
  code = cli.main(
    [
      *common,
      f"--workdir={tmp_path / 'b'}",
      "--download",
      "--framework=fp32",
      "--prompt=none",
      "--epochs=1",
      "--seeds=1",
      "--hidden=8",
    ]
  )
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert len(re.findall(r"lorap: downloaded .*ind\.cora\.", captured.err)) == 8
  assert (tmp_path / "b" / "summary.json").exists()


def test_cli_download_failure_is_reported(
  server, tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(download, "PLANETOID_URL", f"{server}/missing")
  code = cli.main(
    [
      "train",
      "--dataset=cora",
      f"--data-dir={tmp_path}",
      f"--workdir={tmp_path / 'run'}",
      "--download",
    ]
  )
  assert code == 2
  assert re.search(
    r"lorap: error: Download of .*/missing/ind\.cora\.x failed: HTTP 404",
    capsys.readouterr().err,
  )
  assert not list((tmp_path / "planetoid" / "cora").iterdir())


def test_unwritable_destination(server, tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  with pytest.raises(
    lorap_jax.DownloadError,
    match=r"Cannot write the download of http://127\.0\.0\.1:\d+/good/"
    r"ind\.cora\.x into .*a-file: .*(File exists|Not a directory)",
  ):
    lorap_jax.download_file(
      f"{server}/good/ind.cora.x", blocker / "ind.cora.x", None
    )
  with pytest.raises(
    FileNotFoundError,
    match=r"The data directory .*a-file cannot be created: .*File exists",
  ):
    lorap_jax.fetch_dataset("cora", blocker, base_url=f"{server}/good")
