"""Shared pytest settings and fixtures (Equinox-style strictness)."""

import os
import pathlib

import jax
import pytest

# Rank promotion hides shape bugs; strict dtype promotion stays off because
# jraph breaks under it (conventions.md, pitfall 7).
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _find_data_dir() -> pathlib.Path | None:
  configured = os.environ.get("LORAP_DATA_DIR")
  if configured:
    return pathlib.Path(configured)
  beside_checkout = REPO_ROOT.parent / "shared" / "data"
  return beside_checkout if beside_checkout.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The benchmark data directory; tests that need it skip without it."""
  found = _find_data_dir()
  if found is None or not found.is_dir():
    pytest.skip("no data directory: set LORAP_DATA_DIR to the datasets")
  return found


@pytest.fixture
def getkey():
  """Returns a function that hands out fresh PRNG keys (Equinox's getkey)."""
  key = jax.random.key(0)

  def next_key():
    nonlocal key
    key, subkey = jax.random.split(key)
    return subkey

  return next_key
