"""JAX's persistent compilation cache, which the command line turns on.

Short runs are mostly compiling: `lorap train` on MUTAG (INT4 GIN + LoRAP,
one fold, two epochs) takes 48 s, of which a second process with the
compiled programs on disk needs 16. JAX keys each entry by the program, the
backend, the JAX version and the compiler flags, so an entry is only read
back where it is the same program.
"""

import logging
import os
import pathlib

import jax

from lorap_jax._src.data import cache as data_cache

COMPILATION_CACHE_ENV = "LORAP_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")
# With a size limit JAX evicts the least recently used entries and locks
# the directory (filelock), so processes running at once can share it.
MAX_SIZE_BYTES = 2 * 2**30

_log = logging.getLogger(__name__)


def use_compilation_cache(
  path: str | os.PathLike | None = None,
) -> pathlib.Path | None:
  """Keeps compiled programs on disk, for later processes to read back.

  Call it before the first compilation (JAX opens the cache then). A
  directory configured already (`JAX_COMPILATION_CACHE_DIR`, or
  `jax.config`) is kept.

  Args:
    path: The cache directory. None: the `LORAP_COMPILATION_CACHE`
      environment variable if it names one ("0" or "off" turns the cache
      off), else `xla/` in the cache directory of computed datasets
      (`LORAP_CACHE_DIR`, else `~/.cache/lorap_jax`).

  Returns:
    The directory in use, or None where the cache stays off (turned off, or
    no writable default directory, which is logged).
  """
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return pathlib.Path(configured)
  if path is None:
    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if setting.lower() in _OFF:
      return None
    try:
      path = setting or data_cache.resolve_cache_dir() / "xla"
    except OSError as error:
      _log.warning("No compilation cache: %s", error)
      return None
  path = pathlib.Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
  return path
