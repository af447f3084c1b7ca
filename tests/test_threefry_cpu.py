"""The unrolled CPU lowering of the Threefry hash keeps every random bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

import lorap_jax  # noqa: F401  (importing it registers the lowering)
from lorap_jax._src import threefry_cpu

# Random123 known-answer vectors for Threefry-2x32 with 20 rounds:
# (key, counter) -> hashed counter.
KNOWN_ANSWERS = (
  (
    (0x00000000, 0x00000000),
    (0x00000000, 0x00000000),
    (0x6B200159, 0x99BA4EFE),
  ),
  (
    (0xFFFFFFFF, 0xFFFFFFFF),
    (0xFFFFFFFF, 0xFFFFFFFF),
    (0x1CB996FC, 0xBB002BE7),
  ),
  (
    (0x13198A2E, 0x03707344),
    (0x243F6A88, 0x85A308D3),
    (0xC4923A9C, 0x483DF7A0),
  ),
)


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_jax_threefry_matches_known_answers_under_jit(key, counter, expected):
  hashed = jax.jit(threefry_2x32)(
    jnp.array(key, jnp.uint32), jnp.array(counter, jnp.uint32)
  )
  np.testing.assert_array_equal(np.asarray(hashed), np.array(expected))


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_unrolled_hash_matches_known_answers(key, counter, expected):
  words = threefry_cpu.threefry2x32_unrolled(
    *(jnp.asarray(v, jnp.uint32) for v in (*key, *counter))
  )
  assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_rolled_hash_matches_known_answers(key, counter, expected):
  words = jax.jit(threefry_cpu.threefry2x32_rolled)(
    *(jnp.asarray(v, jnp.uint32) for v in (*key, *counter))
  )
  assert tuple(int(w) for w in words) == expected


def _compiled_bits(count):
  return (
    jax.jit(lambda key: jax.random.bits(key, (count,)))
    .lower(jax.random.key(0))
    .compile()
  )


def test_large_draws_compile_without_a_loop_and_small_ones_with_one():
  # The point of the lowering: straight-line code where a call hashes many
  # words (one hash a word), a loop where few. Both draw the same bits:
  # each word hashes its own counter, so the shorter draw is a prefix.
  many = threefry_cpu.UNROLL_FROM_HASHES
  straight, looped = _compiled_bits(many), _compiled_bits(many - 1)
  assert " while(" not in straight.as_text()
  assert " while(" in looped.as_text()
  key = jax.random.key(7)
  np.testing.assert_array_equal(straight(key)[:-1], looped(key))


def test_random_bits_equal_stock_jax_values():
  # Drawn with stock JAX (rolled lowering) before this module existed: a
  # change of bits would change every dropout mask and every result table.
  bits = jax.jit(lambda key: jax.random.bits(key, (4,)))(jax.random.key(0))
  stock = [0xF29A4FA7, 0xFA843692, 0x55110E28, 0x77FAA835]
  np.testing.assert_array_equal(np.asarray(bits), np.array(stock, np.uint32))
