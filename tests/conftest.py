"""Shared pytest settings and fixtures (Equinox-style strictness)."""

import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

# Rank promotion hides shape bugs; strict dtype promotion stays off because
# jraph breaks under it (conventions.md, pitfall 7).
jax.config.update("jax_numpy_rank_promotion", "raise")

# On a GPU, float32 dots default to TF32 (about 1e-3 relative) and scatter-adds
# to atomics whose summation order changes from one program to the next. The
# suite checks float32 and float64 oracles and exact identities (a
# zero-initialised prompt changes nothing, one rng gives one result), which a
# last-bit difference breaks once a quantizer rounds it to a whole step. So it
# asks for IEEE float32 dots and deterministic scatters, as kernels/README.md
# tells users who want the same. Neither changes anything on CPU.
jax.config.update("jax_default_matmul_precision", "highest")
_DETERMINISTIC = "--xla_gpu_deterministic_ops=true"
# Most of the suite's time is XLA compiling, and LLVM's optimisation of the
# CPU code is much of that: at -O1 the suite takes about a fifth less time
# than at the default -O2 (730 s against 910 s on 2 cores; test_quantization
# and test_graph_sweep in one process: 137 s against 174 s), and these small
# programs run about as fast.
# Floating point keeps its IEEE semantics (no fast math at either level), but
# the last bit of a result may move, as it does with XLA's fusion choices, and
# quantized training amplifies that: products of quantized values sit on the
# next quantizer's rounding boundaries (Cora INT4 QAT + LoRAP, 30 epochs: the
# same loss to the last bit; Degree-Quant MUTAG: 0.640 against 0.646 after
# one epoch). The suite passes at both levels; set the flag yourself to test
# at another. (-O0 saves a little more, but once segfaulted compiling an
# eager `jnp.sign` in test_quantization.)
_OPTIMIZATION_LEVEL = "--xla_backend_optimization_level"


def _add_xla_flag(flag: str, unless_present: str) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if unless_present not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


_add_xla_flag(_DETERMINISTIC, unless_present=_DETERMINISTIC)
_add_xla_flag(f"{_OPTIMIZATION_LEVEL}=1", unless_present=_OPTIMIZATION_LEVEL)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Most of the suite's time is XLA compiling, and many tests compile the same
# programs (a Cora GCN step, say) through fresh `jax.jit` objects. A
# compilation cache shared by the session's workers compiles each program
# once (on three training modules, one process: 204 s of CPU against 304 s
# without). It lives for one session (created by the controlling process,
# which the xdist workers inherit it from through the environment), so every
# run still compiles everything it uses at least once. A size limit is what
# makes JAX lock the entries (filelock): without one, a worker could read an
# entry another is still writing.
_CACHE_VARIABLE = "LORAP_TEST_COMPILATION_CACHE"
_OWNED_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
  if not hasattr(config, "workerinput") and _CACHE_VARIABLE not in os.environ:
    cache = tempfile.mkdtemp(prefix="lorap-test-xla-cache-")
    os.environ[_CACHE_VARIABLE] = cache
    config.stash[_OWNED_CACHE] = cache
  if _CACHE_VARIABLE in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_compilation_cache_max_size", 8 * 2**30)


def pytest_unconfigure(config):
  cache = config.stash.get(_OWNED_CACHE, None)
  if cache is not None:
    shutil.rmtree(cache, ignore_errors=True)
    os.environ.pop(_CACHE_VARIABLE, None)


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


@pytest.fixture(scope="session")
def mutag_first_batch(data_dir):
  """MUTAG's first 32 graphs as one padded batch: a small graph-task input."""
  import lorap_jax  # Here: this module sets JAX's options before any import.

  dataset = lorap_jax.load_dataset("mutag", data_dir)
  budgets = lorap_jax.make_budgets(dataset.graphs, 32)
  return next(
    lorap_jax.iterate_batches(
      dataset, np.arange(32), 32, budgets, shuffle=False
    )
  )


@pytest.fixture
def getkey():
  """Returns a function that hands out fresh PRNG keys (Equinox's getkey)."""
  key = jax.random.key(0)

  def next_key():
    nonlocal key
    key, subkey = jax.random.split(key)
    return subkey

  return next_key


# xdist hands each worker whole modules (`--dist loadscope`). Started last, a
# long module leaves the other worker idle at the end (the 8-device module
# alone takes minutes), so the slowest modules go first; the rest keep their
# order. Only the suite's wall time depends on this list.
_SLOWEST_MODULES_FIRST = (
  "test_multidevice.py",
  "test_checkpoints.py",
  "test_degree_quant.py",
  "test_mixq.py",
  "test_train.py",
  "test_sweep.py",
  "test_integer_inference.py",
  "test_modes.py",
  "test_a2q.py",
)
_MODULE_RANK = {name: rank for rank, name in enumerate(_SLOWEST_MODULES_FIRST)}


def pytest_collection_modifyitems(items):
  # Stable: tests keep their order within a module, the others their order.
  items.sort(
    key=lambda item: _MODULE_RANK.get(item.path.name, len(_MODULE_RANK))
  )
