"""An unrolled XLA:CPU lowering of JAX's Threefry-2x32 hash: same bits, faster.

JAX lowers its PRNG hash on CPU as a rolled five-step `fori_loop` (to keep
compile times short) and XLA:CPU runs that loop about 2.7x slower than the
straight-line form it uses on GPU. Dropout masks are drawn every training
step, so on a Cora epoch the loop costs ~0.3 ms of ~8. We register the
straight-line form for CPU where a call hashes many words: the hash, and so
every random number, is bitwise the same; only the compiled program differs.

Small calls (key splits, a parameter's initial values) keep a loop: each
straight-line hash is about a hundred more instructions for XLA to compile
wherever it appears, and a model's initialisation has hundreds of them
(A2Q's GIN on IMDB-BINARY: 25.7 s to compile `init` straight-line, 10.3 s
with small calls rolled) while the loop costs them microseconds at run time.
"""

import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011): rotation constants
# of the even and odd groups of four rounds, and the key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, distance) -> jax.Array:
  """`x` rotated left by `distance` bits (an int, or a traced uint32)."""
  distance = jnp.uint32(distance)
  return jnp.left_shift(x, distance) | jnp.right_shift(
    x, jnp.uint32(32) - distance
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


def threefry2x32_rolled(key1, key2, x1, x2) -> tuple[jax.Array, jax.Array]:
  """`threefry2x32_unrolled` as a loop over its five groups of four rounds:
  the same words, from a program a fifth the size."""
  x1, x2, key1, key2 = jnp.broadcast_arrays(x1, x2, key1, key2)
  keys = (key1, key2, key1 ^ key2 ^ _KEY_PARITY)
  rotations = jnp.asarray(_ROTATIONS, jnp.uint32)

  def group(index, words_and_keys):
    x1, x2, next1, next2, after = words_and_keys
    distances = rotations[index % 2]
    for round_ in range(4):
      x1 = x1 + x2
      x2 = _rotate_left(x2, distances[round_]) ^ x1
    x1 = x1 + next1
    x2 = x2 + next2 + (index + 1).astype(jnp.uint32)
    return x1, x2, next2, after, next1

  x1, x2, *_ = jax.lax.fori_loop(
    0, 5, group, (x1 + keys[0], x2 + keys[1], keys[1], keys[2], keys[0])
  )
  return x1, x2


_UNROLLED = mlir.lower_fun(threefry2x32_unrolled, multiple_results=True)
_ROLLED = mlir.lower_fun(threefry2x32_rolled, multiple_results=True)
# Hashes at one call site from which the straight-line form is used: a
# training batch's dropout mask is larger, a layer's weights mostly smaller.
UNROLL_FROM_HASHES = 4096


def _lower_threefry_by_size(ctx, key1, key2, x1, x2):
  hashes = math.prod(ctx.avals_out[0].shape)
  lowering = _UNROLLED if hashes >= UNROLL_FROM_HASHES else _ROLLED
  return lowering(ctx, key1, key2, x1, x2)


def use_unrolled_threefry_on_cpu() -> None:
  """Makes XLA:CPU compile large Threefry hashes without a loop (idempotent).

  Calls of fewer than `UNROLL_FROM_HASHES` hashes keep a loop (our own,
  `threefry2x32_rolled`, equal to JAX's).

  Affects programs compiled afterwards, in every library of the process; the
  random bits do not change (tests/test_threefry_cpu.py checks the published
  known-answer vectors).
  """
  mlir.register_lowering(
    jex_random.threefry2x32_p,
    _lower_threefry_by_size,
    platform="cpu",
  )
