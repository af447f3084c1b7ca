"""An unrolled XLA:CPU lowering of JAX's Threefry-2x32 hash: same bits, faster.

JAX lowers its PRNG hash on CPU as a rolled five-step `fori_loop` (to keep
compile times short) and XLA:CPU runs that loop about 2.7x slower than the
straight-line form it uses on GPU. Dropout masks are drawn every training
step, so on a Cora epoch the loop costs ~0.3 ms of ~8. We register the
straight-line form for CPU: the hash, and so every random number, is bitwise
the same; only the compiled program differs.
"""

import jax
import jax.extend.random as jex_random
import numpy as np
from jax.interpreters import mlir

# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011): rotation constants
# of the even and odd groups of four rounds, and the key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  return jax.lax.shift_left(x, np.uint32(distance)) | (
    jax.lax.shift_right_logical(x, np.uint32(32 - distance))
  )


def threefry2x32_unrolled(key1, key2, x1, x2) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 of the counters (x1, x2) under the key (key1, key2).

  Args:
    key1, key2: uint32 key words, broadcastable against the counters.
    x1, x2: uint32 counter words, [...].

  Returns:
    The two hashed words, each [...].
  """
  keys = (key1, key2, key1 ^ key2 ^ _KEY_PARITY)
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for group in range(5):
    for distance in _ROTATIONS[group % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, distance) ^ x1
    # Key injection after every four rounds, with the group counter.
    x1 = x1 + keys[(group + 1) % 3]
    x2 = x2 + keys[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


def use_unrolled_threefry_on_cpu() -> None:
  """Makes XLA:CPU compile the Threefry hash without a loop (idempotent).

  Affects programs compiled afterwards, in every library of the process; the
  random bits do not change (tests/test_threefry_cpu.py checks the published
  known-answer vectors).
  """
  mlir.register_lowering(
    jex_random.threefry2x32_p,
    mlir.lower_fun(threefry2x32_unrolled, multiple_results=True),
    platform="cpu",
  )
