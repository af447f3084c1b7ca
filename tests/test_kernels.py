"""Tests of the fused LoRAP prompt op (kernels/lorap_prompt).

Layout (conventions.md, items 11 and 12):
- `KernelSuite` is the backend-agnostic suite, subclassed once per
  implementation. `PallasTest` has an `INTERPRET = True` twin,
  `PallasInterpretTest`, which is what runs on CPU; the compiled Pallas and
  the jax-triton suites run only on a GPU.
- The oracle is `lorap_prompt_reference`, and gradients are checked against
  `jax.vjp` of it, for every input and parameter.
- jax-triton cannot run without a GPU, but everything around the launch
  (vmap folding, layouts, the custom VJP) is tested on CPU with an emulated
  `triton_call` (`TritonPlumbingTest`).

Shapes are small: interpret mode is slow, and the whole file should stay
within about a minute on two CPU cores.
"""

import dataclasses
import functools
import importlib
import json
import pathlib
import re
import sys
import tempfile
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import lorap_jax

kernel_api = importlib.import_module("lorap_jax.kernels.lorap_prompt.api")
config_lib = importlib.import_module("lorap_jax.kernels.lorap_prompt.config")
pallas_lib = importlib.import_module("lorap_jax.kernels.lorap_prompt.pallas")
triton_lib = importlib.import_module("lorap_jax.kernels.lorap_prompt.triton")
reference_lib = importlib.import_module(
  "lorap_jax.kernels.lorap_prompt.reference"
)

lorap_prompt = lorap_jax.kernels.lorap_prompt
lorap_prompt_reference = lorap_jax.kernels.lorap_prompt_reference
BlockConfig = lorap_jax.kernels.BlockConfig

ON_GPU = jax.default_backend() == "gpu"
# A GPU, jax-triton and a Triton release it lowers with (the dispatcher's
# own check), asked once: the skip reasons below name the problem.
TRITON_PROBLEM = triton_lib.runtime_problem()
CAN_RUN_TRITON = TRITON_PROBLEM is None
PARAM_NAMES = ("w_phi", "b_phi", "p_a", "p_b")


# ---------------------------------------------------------------------------
# Inputs and comparison helpers.
# ---------------------------------------------------------------------------


def make_inputs(seed, n, d, k, r, *, codes=False, per_channel=False):
  """Random S (or int8 codes with their grid) and prompt parameters.

  Returns:
    `(s_hat, params, input_kwargs)`; input_kwargs holds `input_scale` and
    `input_zero_point` for codes.
  """
  rng = np.random.default_rng(seed)
  params = {
    "w_phi": rng.normal(size=(d, k)) / np.sqrt(d),
    "b_phi": rng.normal(size=(k,)),
    "p_a": rng.normal(size=(k, r)),
    "p_b": rng.normal(size=(r, d)) * 0.5,
  }
  params = {
    name: jnp.asarray(value, jnp.float32) for name, value in params.items()
  }
  if not codes:
    s_hat = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    return s_hat, params, {}
  s_hat = jnp.asarray(rng.integers(-128, 128, size=(n, d)), jnp.int8)
  if per_channel:
    scale = jnp.asarray(rng.uniform(0.005, 0.03, size=(d,)), jnp.float32)
    zero_point = jnp.asarray(rng.integers(-5, 6, size=(d,)), jnp.float32)
  else:
    scale, zero_point = jnp.float32(0.02), jnp.float32(3.0)
  return s_hat, params, {"input_scale": scale, "input_zero_point": zero_point}


def make_grid(d, bits=4, *, per_channel=False, seed=0):
  """An output grid: per-tensor over [-3, 3], or per-channel ranges."""
  if not per_channel:
    return lorap_jax.affine_qparams(-3.0, 3.0, bits, signed=True)
  rng = np.random.default_rng(seed)
  lo = jnp.asarray(-rng.uniform(1.0, 4.0, size=(d,)), jnp.float32)
  hi = jnp.asarray(rng.uniform(1.0, 4.0, size=(d,)), jnp.float32)
  return lorap_jax.affine_qparams(lo, hi, bits, signed=True)


def call(fn, s_hat, params, grid=None, **kwargs):
  return fn(s_hat, *(params[name] for name in PARAM_NAMES), grid, **kwargs)


def as_row(value):
  """Per-channel [d] values as [1, d] (the suite forbids rank promotion)."""
  value = jnp.asarray(value, jnp.float32)
  return value[None] if value.ndim == 1 else value


def reference_op(s_hat, w_phi, b_phi, p_a, p_b, grid=None, **kwargs):
  """`lorap_prompt_reference` with per-channel vectors given as [1, d] rows.

  The reference's dots are full float32 on a GPU too, like the kernels'.
  """
  if grid is not None:
    grid = lorap_jax.QParams(*(as_row(field) for field in grid))
  for key in ("input_scale", "input_zero_point"):
    if key in kwargs:
      kwargs[key] = as_row(kwargs[key])
  return lorap_prompt_reference(s_hat, w_phi, b_phi, p_a, p_b, grid, **kwargs)


_STATIC_OPTIONS = ("output", "codes_dtype", "rounding", "gradient")


@functools.partial(jax.jit, static_argnames=_STATIC_OPTIONS)
def reference(s_hat, params, grid=None, **kwargs):
  # Jitted: eagerly, every primitive would compile on its own for each shape.
  return call(reference_op, s_hat, params, grid, **kwargs)


def assert_matches_reference(out, want, *, grid=None, output="fake"):
  """Equal up to float rounding; on a grid, a code may flip at a tie.

  A last-bit difference in S_star (another summation order) can move a value
  across a rounding boundary: allow that as a one-step change on at most 1%
  of the entries (none happen on CPU with these seeds).
  """
  chex.assert_equal_shape((out, want))
  assert out.dtype == want.dtype, (out.dtype, want.dtype)
  out = np.asarray(out, np.float64)
  want = np.asarray(want, np.float64)
  if grid is None:
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    return
  step = (
    1.0
    if output == "codes"
    else np.broadcast_to(np.asarray(grid.scale, np.float64), out.shape)
  )
  error = np.abs(out - want)
  assert np.all(error <= step * (1 + 1e-4) + 1e-6), error.max()
  flipped = error > 1e-5
  assert flipped.mean() <= 0.01, flipped.mean()


# ---------------------------------------------------------------------------
# The backend-agnostic suite.
# ---------------------------------------------------------------------------

FORWARD_CASES = (
  # name, (n, d, k, r), input, output grid, output, rounding.
  ("float_no_grid", (37, 16, 4, 2), "float", None, "fake", "half_even"),
  ("float_fake", (100, 64, 8, 4), "float", "tensor", "fake", "half_even"),
  (
    "float_fake_channel_away",
    (64, 32, 16, 8),
    "float",
    "channel",
    "fake",
    "half_away",
  ),
  ("float_codes", (100, 32, 16, 8), "float", "tensor", "codes", "half_even"),
  ("int8_codes", (37, 16, 4, 2), "int8", "tensor", "codes", "half_even"),
  (
    "int8_fake_channel",
    (100, 64, 8, 4),
    "int8_ch",
    "tensor",
    "fake",
    "half_away",
  ),
  ("int8_no_grid", (5, 32, 16, 8), "int8", None, "fake", "half_even"),
)


class KernelSuite(chex.TestCase):
  """The op against its reference; subclasses pick the implementation."""

  IMPLEMENTATION: str = "xla"
  INTERPRET = False

  def op(self, *args, **kwargs):
    return lorap_prompt(
      *args,
      implementation=self.IMPLEMENTATION,
      interpret=self.INTERPRET,
      **kwargs,
    )

  def _case(self, shape, input_kind, grid_kind, seed=0):
    n, d, k, r = shape
    s_hat, params, input_kwargs = make_inputs(
      seed,
      n,
      d,
      k,
      r,
      codes=input_kind.startswith("int8"),
      per_channel=input_kind == "int8_ch",
    )
    grid = (
      None
      if grid_kind is None
      else make_grid(d, per_channel=grid_kind == "channel", seed=seed)
    )
    return s_hat, params, input_kwargs, grid

  @parameterized.named_parameters(*FORWARD_CASES)
  def test_forward_matches_reference(
    self, shape, input_kind, grid_kind, output, rounding
  ):
    s_hat, params, input_kwargs, grid = self._case(shape, input_kind, grid_kind)
    kwargs = dict(input_kwargs, output=output, rounding=rounding)
    out = jax.jit(lambda s, p: call(self.op, s, p, grid, **kwargs))(
      s_hat, params
    )
    chex.assert_shape(out, s_hat.shape)
    want = reference(s_hat, params, grid, **kwargs)
    assert_matches_reference(out, want, grid=grid, output=output)
    if output == "fake" and grid is not None:
      # Really quantized: few levels per column.
      assert len(np.unique(np.asarray(out)[:, 0])) <= 16

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    s_hat, params, _, grid = self._case((37, 16, 4, 2), "float", "tensor")
    out = self.variant(lambda s, p: call(self.op, s, p, grid))(s_hat, params)
    assert_matches_reference(out, reference(s_hat, params, grid), grid=grid)

  @parameterized.named_parameters(
    ("block16_tail", 100, 16),  # 7 blocks, the last one holds 4 rows.
    ("block32_tail", 100, 32),
    ("one_partial_block", 5, 64),
    ("exact_blocks", 64, 16),
  )
  def test_block_sizes_and_tails(self, n, block_n):
    s_hat, params, _, grid = self._case((n, 16, 4, 2), "float", "tensor", 3)
    config = BlockConfig(block_n=block_n)
    out = jax.jit(lambda s, p: call(self.op, s, p, grid, block_config=config))(
      s_hat, params
    )
    out = np.asarray(out)
    # Padded rows must not leak: every written row is finite and right.
    assert np.all(np.isfinite(out))
    assert_matches_reference(out, reference(s_hat, params, grid), grid=grid)

  @parameterized.named_parameters(
    ("float_no_grid", "float", None, "identity"),
    ("float_fake_identity", "float", "tensor", "identity"),
    ("float_fake_clipped", "float", "tensor", "clipped"),
    ("int8_fake_clipped", "int8_ch", "channel", "clipped"),
  )
  def test_gradients_match_reference_vjp(self, input_kind, grid_kind, gradient):
    s_hat, params, input_kwargs, grid = self._case(
      (37, 16, 4, 2), input_kind, grid_kind, seed=5
    )
    if grid is not None:
      # A narrow 3-bit grid, so "clipped" really masks some entries.
      grid = lorap_jax.affine_qparams(-1.0, 1.0, 3, signed=True)
    cotangent = jnp.asarray(
      np.random.default_rng(6).normal(size=s_hat.shape), jnp.float32
    )
    # Differentiate every float input: S (or the input grid), all parameters.
    if input_kind == "float":
      primals = {"s_hat": s_hat, **params}
    else:
      primals = {**params, **input_kwargs}

    def run(fn, primals):
      args = {"s_hat": s_hat, **input_kwargs, **primals}
      extra = {
        key: args[key]
        for key in ("input_scale", "input_zero_point")
        if key in args
      }
      return fn(
        args["s_hat"],
        *(args[name] for name in PARAM_NAMES),
        grid,
        gradient=gradient,
        **extra,
      )

    @jax.jit
    def value_and_vjp(primals, cotangent):
      out, vjp_fn = jax.vjp(lambda p: run(self.op, p), primals)
      want_out, want_vjp_fn = jax.vjp(lambda p: run(reference_op, p), primals)
      return (out, vjp_fn(cotangent)[0]), (want_out, want_vjp_fn(cotangent)[0])

    (out, grads), (want_out, want) = value_and_vjp(primals, cotangent)
    assert_matches_reference(out, want_out, grid=grid)
    chex.assert_trees_all_equal_shapes(grads, primals)
    for name in PARAM_NAMES:
      assert np.abs(np.asarray(grads[name])).max() > 1e-4, name
    chex.assert_trees_all_close(grads, want, atol=1e-4, rtol=1e-4)

  @parameterized.named_parameters(
    ("identity", "identity"), ("clipped", "clipped")
  )
  def test_straight_through_gradient(self, gradient):
    # With P_B = 0 the prompt is a no-op, so d out / d S is the quantizer's
    # STE alone: the identity, or the identity masked where codes clipped.
    s_hat, params, _, _ = self._case((37, 16, 4, 2), "float", None, seed=12)
    params = {**params, "p_b": jnp.zeros_like(params["p_b"])}
    grid = lorap_jax.affine_qparams(-1.0, 1.0, 3, signed=True)
    cotangent = jnp.asarray(
      np.random.default_rng(13).normal(size=s_hat.shape), jnp.float32
    )
    _, vjp_fn = jax.vjp(
      lambda s: call(self.op, s, params, grid, gradient=gradient), s_hat
    )
    (s_grad,) = vjp_fn(cotangent)
    codes = np.round(
      np.asarray(s_hat) / float(grid.scale) + float(grid.zero_point)
    )
    inside = (codes >= float(grid.qmin)) & (codes <= float(grid.qmax))
    assert 0 < inside.mean() < 1  # Both cases occur.
    want = np.asarray(cotangent)
    if gradient == "clipped":
      want = np.where(inside, want, 0.0)
    np.testing.assert_allclose(np.asarray(s_grad), want, atol=1e-6)

  def test_codes_output_has_no_gradient(self):
    s_hat, params, _, grid = self._case((37, 16, 4, 2), "float", "tensor")

    def loss(p):
      out = call(self.op, s_hat, p, grid, output="codes")
      return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss))(params)
    for name in PARAM_NAMES:
      np.testing.assert_array_equal(np.asarray(grads[name]), 0.0)

  def test_vmap_over_s_with_broadcast_parameters(self):
    s_hat, params, _, grid = self._case((37, 16, 4, 2), "float", "tensor", 7)
    batch = jnp.stack([s_hat, 2.0 * s_hat, -s_hat])
    fn = lambda s, p: call(self.op, s, p, grid)
    out = jax.jit(jax.vmap(fn, in_axes=(0, None)))(batch, params)
    chex.assert_shape(out, batch.shape)
    for i in range(batch.shape[0]):
      assert_matches_reference(
        out[i], reference(batch[i], params, grid), grid=grid
      )

  def test_vmap_over_parameters_and_grid_with_shared_s(self):
    s_hat, params, _, _ = self._case((37, 16, 4, 2), "float", None, 8)
    p_bs = jnp.stack([params["p_b"], 0.5 * params["p_b"]])
    grids = lorap_jax.affine_qparams(
      jnp.array([-3.0, -2.0]), jnp.array([3.0, 2.0]), jnp.array([4.0, 3.0])
    )

    def fn(p_b, grid):
      return call(self.op, s_hat, {**params, "p_b": p_b}, grid)

    out = jax.jit(jax.vmap(fn))(p_bs, grids)
    for i in range(2):
      grid_i = jax.tree.map(lambda f, i=i: f[i], grids)
      want = reference(s_hat, {**params, "p_b": p_bs[i]}, grid_i)
      assert_matches_reference(out[i], want, grid=grid_i)

  def test_vmap_of_grad(self):
    s_hat, params, _, grid = self._case((37, 16, 4, 2), "float", "tensor", 9)
    batch = jnp.stack([s_hat, 0.5 * s_hat])

    def loss(fn, p, s):
      return jnp.sum(call(fn, s, p, grid) ** 2)

    grads = jax.jit(
      jax.vmap(jax.grad(lambda p, s: loss(self.op, p, s)), in_axes=(None, 0))
    )(params, batch)
    want = jax.jit(
      jax.vmap(
        jax.grad(lambda p, s: loss(reference_op, p, s)), in_axes=(None, 0)
      )
    )(params, batch)
    chex.assert_trees_all_close(grads, want, atol=1e-4, rtol=1e-4)


class XlaTest(KernelSuite):
  IMPLEMENTATION = "xla"


class PallasTest(KernelSuite):
  """Compiled Pallas (GPU only; a skip in setUp, as marks are inherited)."""

  IMPLEMENTATION = "pallas"

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and not ON_GPU:
      self.skipTest("compiled Pallas needs a GPU; the interpret twin runs")


class PallasInterpretTest(PallasTest):
  """The interpret twin: the kernel run as XLA ops (the CPU path)."""

  INTERPRET = True


@pytest.mark.gpu
@pytest.mark.skipif(
  not CAN_RUN_TRITON,
  reason=str(TRITON_PROBLEM),
)
class TritonTest(KernelSuite):
  IMPLEMENTATION = "triton"


@pytest.mark.gpu
@pytest.mark.skipif(
  not CAN_RUN_TRITON,
  reason=str(TRITON_PROBLEM),
)
class CrossImplementationTest(chex.TestCase):
  """triton vs pallas vs reference on the GPU (conventions.md, pitfall 3)."""

  @parameterized.named_parameters(
    ("cora_like", 2708, 64, 8, 4), ("wide", 1000, 256, 16, 8)
  )
  def test_triton_pallas_reference_agree(self, n, d, k, r):
    s_hat, params, _ = make_inputs(11, n, d, k, r)
    grid = make_grid(d)
    outs = {
      name: call(lorap_prompt, s_hat, params, grid, implementation=name)
      for name in ("triton", "pallas")
    }
    want = reference(s_hat, params, grid)
    for out in outs.values():
      assert_matches_reference(out, want, grid=grid)


# ---------------------------------------------------------------------------
# The jax-triton wrapper, with an emulated launch (runs on CPU).
# ---------------------------------------------------------------------------


def emulated_triton_call(
  s, w, b, pa, pb, in_scale, in_zero, scale, zero, qmin, qmax, **kwargs
):
  """What the Triton kernel computes, from the arguments triton.py passes.

  Checks the launch contract (leading batch dimension everywhere, padded
  widths, grid) and evaluates the reference per batch element.
  """
  out_shape = kwargs["out_shape"]
  batch, n, d = s.shape
  k, r = kwargs["k"], kwargs["r"]
  assert (kwargs["n_rows"], kwargs["d"]) == (n, d)
  assert w.shape == (batch, d, k) and b.shape == (batch, k)
  assert pa.shape == (batch, k, r) and pb.shape == (batch, r, d)
  assert kwargs["grid"] == (-(-n // kwargs["block_n"]), batch)
  assert kwargs["d_pad"] >= max(16, d) and kwargs["k_pad"] >= 16
  assert out_shape.shape == (batch, n, d)

  def one(s, w, b, pa, pb, *vectors):
    in_scale, in_zero, scale, zero, qmin, qmax = (v[None] for v in vectors)
    input_kwargs = {}
    if kwargs["int_input"]:
      input_kwargs = {"input_scale": in_scale, "input_zero_point": in_zero}
    grid = None
    if kwargs["quantize"]:
      grid = lorap_jax.QParams(scale, zero, qmin, qmax)
    return lorap_prompt_reference(
      s,
      w,
      b,
      pa,
      pb,
      grid,
      output="codes" if kwargs["codes_out"] else "fake",
      codes_dtype=out_shape.dtype,
      rounding="half_even" if kwargs["half_even"] else "half_away",
      **input_kwargs,
    )

  return jax.vmap(one)(
    s, w, b, pa, pb, in_scale, in_zero, scale, zero, qmin, qmax
  )


class TritonPlumbingTest(KernelSuite):
  """The suite through triton.py with `triton_call` emulated on CPU."""

  IMPLEMENTATION = "triton"

  def setUp(self):
    super().setUp()
    patcher = pytest.MonkeyPatch()
    self.addCleanup(patcher.undo)
    if not CAN_RUN_TRITON:
      patcher.setattr(triton_lib, "check_supported", lambda *a: None)
      patcher.setattr(triton_lib, "_call_triton", emulated_triton_call)

  def test_nested_vmap_folds_into_one_launch(self):
    seen = []

    def recording_call(*args, **kwargs):
      seen.append(args[0].shape)
      return emulated_triton_call(*args, **kwargs)

    if not CAN_RUN_TRITON:
      patcher = pytest.MonkeyPatch()
      self.addCleanup(patcher.undo)
      patcher.setattr(triton_lib, "_call_triton", recording_call)
    s_hat, params, _, grid = self._case((20, 16, 4, 2), "float", "tensor")
    batch = jnp.stack([jnp.stack([s_hat, -s_hat, 2 * s_hat])] * 2)
    fn = lambda s: call(self.op, s, params, grid)
    out = jax.jit(jax.vmap(jax.vmap(fn)))(batch)
    chex.assert_shape(out, (2, 3, 20, 16))
    if not CAN_RUN_TRITON:
      # Both vmap axes fold into a launch of batch 2 * 3 = 6. (custom_vmap
      # also traces the launch at the inner levels, batch 1 and 3; those
      # traces are replaced by the outer rule's.)
      assert (6, 20, 16) in seen
      assert max(shape[0] for shape in seen) == 6
    assert_matches_reference(
      out[1, 2], reference(2 * s_hat, params, grid), grid=grid
    )


# ---------------------------------------------------------------------------
# Pieces of the kernels.
# ---------------------------------------------------------------------------


class RoundingTest(parameterized.TestCase):
  def _values(self):
    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.5, -7.5]
    # Just below 1/2 (floor(x + 0.5) gets it wrong), signed zeros, large.
    edges = [0.49999997, -0.49999997, 0.0, -0.0, 2.0**22 + 0.5, 1e30, -1e30]
    special = np.array([*ties, *edges, 2.0**23 + 1, -(2.0**23) - 1], np.float32)
    rng = np.random.default_rng(0)
    halves = rng.integers(-1000, 1000, 500) + 0.5
    noise = rng.normal(size=2000) * 100
    return jnp.asarray(np.concatenate([special, halves, noise]), jnp.float32)

  def test_half_even_is_bit_identical_to_jnp_round(self):
    x = self._values()
    np.testing.assert_array_equal(
      np.asarray(pallas_lib.round_half_even(x)), np.asarray(jnp.round(x))
    )

  def test_half_away_is_the_reference_rule(self):
    x = self._values()
    np.testing.assert_array_equal(
      np.asarray(pallas_lib.round_half_away(x)),
      np.asarray(lorap_jax.round_to_integer(x, "half_away")),
    )


class FoldVmapTest(parameterized.TestCase):
  def test_folds_vmap_axes_and_broadcasts_unbatched(self):
    seen = []

    def batched(x, y):
      seen.append((x.shape, y.shape))
      return x * y[:, :, None]

    fn = triton_lib.fold_vmap_into_batch(batched)
    x = jnp.arange(4.0 * 5 * 3).reshape(4, 1, 5, 3)
    y = jnp.arange(5.0)[None]
    out = jax.vmap(fn, in_axes=(0, None))(x, y)
    chex.assert_trees_all_close(out, x * y[None, :, :, None])
    assert seen[-1] == ((4, 5, 3), (4, 5))
    out = jax.jit(jax.vmap(jax.vmap(fn, in_axes=(0, None)), in_axes=(0, None)))(
      jnp.stack([x, -x]), y
    )
    chex.assert_shape(out, (2, 4, 1, 5, 3))
    assert seen[-1] == ((8, 5, 3), (8, 5))


# ---------------------------------------------------------------------------
# The dispatcher.
# ---------------------------------------------------------------------------


def _inputs():
  s_hat, params, _ = make_inputs(21, 12, 16, 4, 2)
  return (s_hat, *(params[name] for name in PARAM_NAMES))


class DispatchTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("name", "cuda", r"implementation=\['cuda'\] unknown"),
    ("in_sequence", ("pallas", "tpu"), r"implementation=\['tpu'\] unknown"),
    ("auto_in_sequence", ("auto", "xla"), r"implementation=\['auto'\]"),
    ("empty", (), r"names no implementation"),
  )
  def test_refuses_unknown_names(self, implementation, message):
    with pytest.raises(ValueError, match=message):
      lorap_prompt(*_inputs(), implementation=implementation)

  @parameterized.named_parameters(("none", None), ("auto", "auto"))
  def test_auto_on_this_backend(self, implementation):
    resolved = kernel_api.resolve_implementations(implementation)
    measured = config_lib.measured_auto_order(jax.devices()[0].device_kind)
    if not ON_GPU:
      assert resolved == ("xla",)
      jaxpr = str(
        jax.make_jaxpr(
          lambda *a: lorap_prompt(*a, implementation=implementation)
        )(*_inputs())
      )
      assert "pallas_call" not in jaxpr
    elif measured:
      assert resolved == measured
    else:
      assert resolved[-1] == "xla" and resolved[0] in ("triton", "pallas")

  @parameterized.named_parameters(
    ("cpu", "cpu", None, ("xla",)),
    ("old_gpu", "gpu", 7.5, ("pallas", "xla")),
    ("rocm_like", "gpu", None, ("pallas", "xla")),
    ("ampere", "gpu", 8.0, ("triton", "pallas", "xla")),
    ("hopper", "gpu", 9.0, ("triton", "pallas", "xla")),
  )
  def test_auto_order(self, backend, capability, want):
    patcher = pytest.MonkeyPatch()
    self.addCleanup(patcher.undo)
    patcher.setattr(kernel_api.jax, "default_backend", lambda: backend)
    patcher.setattr(triton_lib, "compute_capability", lambda: capability)
    patcher.setattr(config_lib, "measured_auto_order", lambda kind: None)
    assert kernel_api.auto_implementations() == want

  def test_measured_auto_order_wins_on_its_gpu(self):
    with tempfile.TemporaryDirectory() as directory:
      path = pathlib.Path(directory) / "tuned.json"
      path.write_text(json.dumps({"Fake GPU": {"auto_order": ["xla"]}}))
      measured = functools.partial(config_lib.measured_auto_order, path=path)
      assert measured("Fake GPU") == ("xla",) and measured("Other") is None
      # The order is no block config: the tuned table skips it.
      assert config_lib.load_tuned_configs(path) == {"Fake GPU": {}}
    patcher = pytest.MonkeyPatch()
    self.addCleanup(patcher.undo)
    patcher.setattr(kernel_api.jax, "default_backend", lambda: "gpu")
    patcher.setattr(triton_lib, "compute_capability", lambda: 9.0)
    patcher.setattr(config_lib, "measured_auto_order", lambda kind: ("xla",))
    assert kernel_api.auto_implementations() == ("xla",)
    patcher.setattr(config_lib, "measured_auto_order", lambda kind: ("cuda",))
    with pytest.raises(ValueError, match=r"auto_order=\['cuda'\] must name"):
      kernel_api.auto_implementations()

  @parameterized.named_parameters(
    (
      "too_old",
      "3.6.0",
      r"Triton 3\.6\.0 is installed, jax-triton needs >= 3\.7",
    ),
    ("local_build_too_old", "3.6.0+git1a2b", r"Triton 3\.6\.0\+git1a2b"),
    ("new_enough", "3.7.0", None),
    ("newer", "3.10.1", None),
  )
  def test_triton_release_is_checked_before_dispatch(self, version, message):
    # jax-triton 0.4.1 fails inside Triton 3.6's compiler at lowering time,
    # after dispatch: the check must decline first so that Pallas runs.
    patcher = pytest.MonkeyPatch()
    self.addCleanup(patcher.undo)
    patcher.setattr(triton_lib, "compute_capability", lambda: 9.0)
    patcher.setitem(sys.modules, "jax_triton", types.ModuleType("jax_triton"))
    fake_triton = types.ModuleType("triton")
    fake_triton.__version__ = version
    patcher.setitem(sys.modules, "triton", fake_triton)
    if message is None:
      assert triton_lib.runtime_problem() is None
      triton_lib.check_supported(*_inputs()[:2])
    else:
      assert re.search(message, triton_lib.runtime_problem())
      with pytest.raises(NotImplementedError, match=message):
        triton_lib.check_supported(*_inputs()[:2])

  def test_falls_back_in_order(self):
    args = _inputs()
    want = lorap_prompt_reference(*args)
    chain = ("triton", "pallas", "xla")
    if not ON_GPU:
      # Neither fused path can run compiled here: xla answers.
      jaxpr = str(
        jax.make_jaxpr(lambda *a: lorap_prompt(*a, implementation=chain))(*args)
      )
      assert "pallas_call" not in jaxpr
    # With interpret=True, Pallas is next in line after triton declines.
    run = lambda *a: lorap_prompt(*a, implementation=chain, interpret=True)
    jaxpr = str(jax.make_jaxpr(run)(*args))
    if not CAN_RUN_TRITON:
      assert "pallas_call" in jaxpr
    chex.assert_trees_all_close(run(*args), want, atol=1e-5)

  def test_unsupported_dtype_falls_back_to_xla(self):
    s_hat, *params = _inputs()
    s_hat = s_hat.astype(jnp.bfloat16)
    params = [p.astype(jnp.bfloat16) for p in params]
    run = lambda *a: lorap_prompt(
      *a, implementation=("triton", "pallas", "xla"), interpret=True
    )
    assert "pallas_call" not in str(jax.make_jaxpr(run)(s_hat, *params))
    assert run(s_hat, *params).dtype == jnp.bfloat16

  @pytest.mark.skipif(ON_GPU, reason="on a GPU the fused paths can run")
  def test_exception_group_when_every_backend_fails(self):
    with pytest.raises(ExceptionGroup) as info:
      lorap_prompt(*_inputs(), implementation=("triton", "pallas"))
    errors = info.value.exceptions
    assert len(errors) == 2
    assert all(isinstance(e, NotImplementedError) for e in errors)
    assert "triton" in str(errors[0]) and "interpret=True" in str(errors[1])

  @parameterized.named_parameters(
    ("codes_without_grid", {"output": "codes"}, r'output="codes" needs a grid'),
    ("bad_output", {"output": "ints"}, r"output='ints' is not one of"),
    ("bad_rounding", {"rounding": "up"}, r"rounding='up' is not one of"),
    ("bad_gradient", {"gradient": "none"}, r"gradient='none' is not one of"),
    ("float_with_scale", {"input_scale": 0.1}, r"only for integer-code s_hat"),
  )
  def test_refuses_bad_options(self, kwargs, message):
    with pytest.raises(ValueError, match=message):
      lorap_prompt(*_inputs(), **kwargs)

  def test_refuses_codes_without_scale(self):
    s_hat, *params = _inputs()
    with pytest.raises(ValueError, match=r"input_scale .* must be given"):
      lorap_prompt(s_hat.astype(jnp.int8), *params)

  @parameterized.named_parameters(
    ("too_narrow", jnp.int8, 12, r"codes_dtype=int8 cannot hold the grid"),
    ("not_integer", jnp.float32, 4, r"must be an integer dtype"),
  )
  def test_refuses_bad_codes_dtype(self, codes_dtype, bits, message):
    grid = lorap_jax.affine_qparams(-1.0, 1.0, bits, signed=True)
    with pytest.raises(ValueError, match=message):
      lorap_prompt(*_inputs(), grid, output="codes", codes_dtype=codes_dtype)

  def test_wide_codes_dtype(self):
    grid = lorap_jax.affine_qparams(-1.0, 1.0, 12, signed=True)
    out = lorap_prompt(*_inputs(), grid, output="codes", codes_dtype=jnp.int16)
    assert out.dtype == jnp.int16
    assert np.abs(np.asarray(out)).max() > 127

  @parameterized.named_parameters(
    ("s_rank", 0, (12, 16, 1), r"s_hat.shape=\(12, 16, 1\) must be"),
    ("grid_field", None, None, r"grid.scale has shape \(3,\)"),
  )
  def test_refuses_bad_shapes(self, position, shape, message):
    args = list(_inputs())
    grid = None
    if position is None:
      grid = lorap_jax.QParams(jnp.ones(3), 0.0, -8.0, 7.0)
    else:
      args[position] = jnp.ones(shape)
    with pytest.raises(ValueError, match=message):
      lorap_prompt(*args, grid)


# ---------------------------------------------------------------------------
# Block configs.
# ---------------------------------------------------------------------------


class BlockConfigTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("not_power_of_two", {"block_n": 48}, r"block_n=48 must be a power"),
    ("too_small", {"block_n": 8}, r"block_n=8 must be a power"),
    ("warps", {"num_warps": 3}, r"num_warps=3 must be"),
    ("stages", {"num_stages": 0}, r"num_stages=0 must be"),
  )
  def test_refuses(self, kwargs, message):
    with pytest.raises(ValueError, match=message):
      BlockConfig(**kwargs)

  def test_frozen_keyword_only_hashable(self):
    config = BlockConfig(block_n=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
      config.block_n = 64
    with pytest.raises(TypeError):
      BlockConfig(32)
    assert hash(config) == hash(BlockConfig(block_n=32))

  @parameterized.named_parameters(
    ("cora", 2708, 64, BlockConfig(block_n=128, num_warps=4)),
    ("arxiv", 169343, 256, BlockConfig(block_n=32, num_warps=4)),
    ("large", 2_000_000, 128, BlockConfig(block_n=64, num_warps=4)),
    ("narrow", 1000, 7, BlockConfig(block_n=256, num_warps=4)),
    ("tiny_graph", 37, 16, BlockConfig(block_n=64, num_warps=4)),
    ("very_wide", 100, 4096, BlockConfig(block_n=16, num_warps=8)),
  )
  def test_heuristic(self, n, d, want):
    assert config_lib.get_default(n, d, 8, 4) == want

  def test_tuned_entry_wins(self):
    with tempfile.TemporaryDirectory() as directory:
      path = pathlib.Path(directory) / "tuned.json"
      entry = {"block_n": 32, "num_warps": 2, "num_stages": 1}
      path.write_text(
        json.dumps({"Fake GPU": {"triton": {"d=64,k=8,r=4": entry}}})
      )
      tuned = config_lib.load_tuned_configs(path)
    patcher = pytest.MonkeyPatch()
    self.addCleanup(patcher.undo)
    patcher.setattr(config_lib, "load_tuned_configs", lambda: tuned)
    got = config_lib.get_default(2708, 64, 8, 4, "Fake GPU")
    assert got == BlockConfig(**entry)
    # Other shapes, implementations and devices use the heuristic.
    heuristic = config_lib.heuristic(2708, 64)
    assert config_lib.get_default(2708, 64, 16, 4, "Fake GPU") == heuristic
    assert (
      config_lib.get_default(
        2708, 64, 8, 4, "Fake GPU", implementation="pallas"
      )
      == heuristic
    )
    assert config_lib.get_default(2708, 64, 8, 4, "Other") == heuristic

  def test_checked_in_table_parses(self):
    table = config_lib.load_tuned_configs()
    assert isinstance(table, dict)
    for device in table:
      order = config_lib.measured_auto_order(device) or ()
      assert set(order) <= set(kernel_api.IMPLEMENTATIONS), (device, order)


# ---------------------------------------------------------------------------
# The LoRAP module picks the implementation from its config.
# ---------------------------------------------------------------------------


class ModuleTest(chex.TestCase):
  def test_defaults_are_auto(self):
    assert lorap_jax.PromptConfig().implementation == "auto"
    assert lorap_jax.LoRAP(num_prompts=2, rank=1).implementation == "auto"

  @parameterized.named_parameters(
    ("auto", "auto"),
    ("pallas_then_xla", ("pallas", "xla")),
    ("xla", "xla"),
  )
  def test_module_runs_each_choice(self, implementation):
    s_hat, params, _ = make_inputs(31, 12, 16, 4, 2)
    module = lorap_jax.LoRAP(
      num_prompts=4, rank=2, implementation=implementation
    )
    out = module.apply({"params": params}, s_hat)
    chex.assert_trees_all_close(out, reference(s_hat, params), atol=2e-5)


# Keep the abstract suite itself from being collected twice under its name.
del KernelSuite
