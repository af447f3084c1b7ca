"""The on-disk compilation cache: a second process reads programs back."""

import os
import pathlib
import subprocess
import sys

import jax

import lorap_jax

# Compiles one program and prints the cache directory and the cache events.
_PROBE = """
import jax, jax.numpy as jnp, lorap_jax
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
path = lorap_jax.use_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
hits = "/jax/compilation_cache/cache_hits" in events
misses = "/jax/compilation_cache/cache_misses" in events
print(path, hits, misses)
"""


def _probe(tmp_path, **env) -> list[str]:
  environment = {
    key: value
    for key, value in os.environ.items()
    # The test session's own cache (tests/conftest.py) stays out.
    if key not in ("LORAP_TEST_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")
  }
  environment.update(LORAP_CACHE_DIR=str(tmp_path / "cache"), **env)
  done = subprocess.run(
    [sys.executable, "-c", _PROBE],
    env=environment,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  return done.stdout.split()


def test_a_second_process_reads_the_compiled_program_back(tmp_path):
  xla = str(tmp_path / "cache" / "xla")
  assert _probe(tmp_path) == [xla, "False", "True"]
  assert any(pathlib.Path(xla).glob("jit__lambda-*-cache"))
  assert _probe(tmp_path) == [xla, "True", "False"]


def test_the_cache_can_be_turned_off_or_placed(tmp_path):
  assert _probe(tmp_path, LORAP_COMPILATION_CACHE="off") == [
    "None",
    "False",
    "False",
  ]
  assert not (tmp_path / "cache" / "xla").exists()
  elsewhere = str(tmp_path / "elsewhere")
  assert _probe(tmp_path, LORAP_COMPILATION_CACHE=elsewhere)[0] == elsewhere


def test_a_configured_directory_is_kept(tmp_path):
  # This session's cache (tests/conftest.py) is configured already.
  configured = jax.config.jax_compilation_cache_dir
  assert configured
  assert lorap_jax.use_compilation_cache(tmp_path) == pathlib.Path(configured)
  assert jax.config.jax_compilation_cache_dir == configured
