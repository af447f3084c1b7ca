"""Dot precision and block size of the LoRAP prompt: latency and accuracy.

Usage (GPU; TF32 variants do not exist on CPU):
  .venv/bin/python experiments/probe_kernel_precision.py [--shapes large,arxiv]

For k = 8, r = 4, float32 in and out without an output quantizer, one
Markdown row per (shape, path, dot precision, block): the median latency of
20 calls (benchmark_kernel.py's timer) and the largest absolute error on the
first 20,000 rows against the prompt in float64 NumPy. The XLA path swaps the
reference's dot (`reference._dot`), the Pallas path `pallas.DOT_PRECISION`;
both are read at trace time, so the caches are cleared between variants.
kernels/README.md ("GPU") holds the H200 table this printed.
"""

import argparse
import functools

import benchmark_kernel as bench
import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax.kernels.lorap_prompt import config as config_lib
from lorap_jax.kernels.lorap_prompt import pallas as pallas_lib
from lorap_jax.kernels.lorap_prompt import reference as reference_lib

PRESETS = jax.lax.DotAlgorithmPreset
PRECISIONS = {
  "IEEE (HIGHEST)": jax.lax.Precision.HIGHEST,
  "TF32 x 3": PRESETS.TF32_TF32_F32_X3,
  "BF16 x 6": PRESETS.BF16_BF16_F32_X6,
  "TF32 (default)": jax.lax.Precision.DEFAULT,
}
BLOCKS = (None, config_lib.BlockConfig(block_n=16, num_warps=2))
CHECKED_ROWS = 20_000


def float64_prompt(s, params):
  s = np.asarray(s, np.float64)
  w, b, p_a, p_b = (np.asarray(p, np.float64) for p in params)
  logits = s @ w + b
  alpha = np.exp(logits - logits.max(-1, keepdims=True))
  alpha /= alpha.sum(-1, keepdims=True)
  return s + alpha @ p_a @ p_b


def set_precision(path: str, precision) -> None:
  if path == "pallas":
    pallas_lib.DOT_PRECISION = precision
  else:
    reference_lib._dot = functools.partial(jnp.matmul, precision=precision)
  jax.clear_caches()


def row(n, d, path, name, block, s, params, want) -> str:
  fn = jax.jit(
    lambda s, params: bench.lorap_jax.kernels.lorap_prompt(
      s, *params, implementation=path, block_config=block
    )
  )
  label = (
    "heuristic" if block is None else f"({block.block_n}, {block.num_warps})"
  )
  cells = [f"{n:,} x {d}", path, name, label]
  try:
    seconds = bench.time_fn(fn, s, params, repeats=20)
    got = np.asarray(fn(s[:CHECKED_ROWS], params), np.float64)
  except Exception as error:  # A variant the compiler refuses.
    reason = str(error).strip().splitlines()[0][:100]
    cells += [f"{type(error).__name__}: {reason}", ""]
  else:
    error = np.max(np.abs(got - want))
    cells += [bench.fmt_time(seconds), f"{error:.1e}"]
  return "| " + " | ".join(cells) + " |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shapes", default="large,arxiv")
  args = parser.parse_args()
  if not bench.on_gpu():
    print("No GPU: the fused kernel and the TF32 variants run only there.")
    return
  print("| n x d | path | dots | block (rows, warps) | latency | max error |")
  print("|---|---|---|---|---|---|")
  key = jax.random.key(0)
  for shape in args.shapes.split(","):
    n, d = bench.SHAPES[shape]
    s, params, _, _ = bench.prompt_inputs(n, d, 8, 4, "float", key)
    want = float64_prompt(s[:CHECKED_ROWS], params)
    for name, precision in PRECISIONS.items():
      for path in ("xla", "pallas"):
        set_precision(path, precision)
        for block in BLOCKS if path == "pallas" else (None,):
          print(row(n, d, path, name, block, s, params, want), flush=True)
    for path in ("xla", "pallas"):
      set_precision(path, jax.lax.Precision.HIGHEST)


if __name__ == "__main__":
  main()
