"""Latency of the LoRAP prompt: unfused (XLA) vs fused (Pallas, jax-triton).

Usage:
  .venv/bin/python experiments/benchmark_kernel.py [--shapes cora,arxiv,large]
      [--repeats 50] [--modes float,int8] [--kr 8x4,16x8]
      [--tune [--write-tuned]]

Per shape (Cora 2,708 x 64, ogbn-arxiv 169,343 x 256, 2,000,000 x 128) and
(k, r) in {8, 16} x {4, 8}, one Markdown row per input mode:

- "float": float32 S in, fake-quantized float32 S_star out (the training
  forward pass); "int8": int8 codes in, int8 codes out (inference).
- FP32 layer: one GCN layer without prompt, X @ W then a normalised
  segment_sum over a random graph with 5 in-edges per node (uniform random
  senders), as the reference point for the prompt's overhead.
- XLA: `lorap_prompt(..., implementation="xla")` under jit, i.e. the
  reference as XLA compiles it (on a GPU: separate GEMM / softmax / GEMM /
  elementwise kernels).
- Pallas, Triton: the fused kernels; "n/a (CPU)" without a GPU (interpret
  mode is a correctness tool, not a performance path), "n/a" when the
  implementation declines the shape.
- GB/s: (bytes of S read + bytes of S_star written + parameters) / latency,
  against the device's copy bandwidth, measured as `x + 1` over a large
  float32 array (one read and one write per element).

Latencies are medians over `--repeats` calls after two warm-up (compiling)
calls, each call timed to `block_until_ready`. On CPU only the Cora shape
runs by default: the large ones take minutes on a laptop-class CPU and say
nothing about the kernels.

`--tune` (GPU only) times a grid of `BlockConfig`s per shape for each fused
implementation and prints the best; `--write-tuned` stores them in
kernels/lorap_prompt/tuned_configs.json under the device kind, where
`config.get_default` finds them.
"""

import argparse
import datetime
import importlib
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import lorap_jax

config_lib = importlib.import_module("lorap_jax.kernels.lorap_prompt.config")

SHAPES = {
  "cora": (2708, 64),
  "arxiv": (169_343, 256),
  "large": (2_000_000, 128),
}
KR = ((8, 4), (8, 8), (16, 4), (16, 8))
MODES = ("float", "int8")
IN_DEGREE = 5
FUSED = ("pallas", "triton")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def time_fn(fn, *args, repeats: int) -> float:
  """Median seconds per call of `fn(*args)`, after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def copy_bandwidth(repeats: int) -> float:
  """Bytes per second of `x + 1` on a large float32 array (read + write)."""
  size = (1024 if on_gpu() else 64) * 2**20 // 4
  x = jnp.zeros((size,), jnp.float32)
  seconds = time_fn(jax.jit(lambda x: x + 1.0), x, repeats=repeats)
  return 2 * x.nbytes / seconds


def random_graph(n: int, key):
  """Receivers with `IN_DEGREE` in-edges each, uniform random senders, and
  GCN's symmetric normalisation 1 / sqrt(deg_s * deg_r) per edge."""
  receivers = jnp.repeat(jnp.arange(n, dtype=jnp.int32), IN_DEGREE)
  senders = jax.random.randint(key, receivers.shape, 0, n, jnp.int32)
  out_degree = jnp.zeros(n).at[senders].add(1.0)
  norm = jax.lax.rsqrt(jnp.maximum(out_degree[senders], 1.0) * IN_DEGREE)
  return senders, receivers, norm


@jax.jit
def gcn_layer(x, w, senders, receivers, norm):
  """The FP32 layer without prompt: segment_sum of normalised X @ W."""
  h = x @ w
  messages = h[senders] * norm[:, None]
  return jax.ops.segment_sum(messages, receivers, num_segments=x.shape[0])


def prompt_inputs(n, d, k, r, mode, key):
  """S (or its int8 codes and grid), the parameters and the output grid."""
  keys = jax.random.split(key, 5)
  s = jax.random.normal(keys[0], (n, d), jnp.float32)
  params = (
    jax.random.normal(keys[1], (d, k)) / np.sqrt(d),
    jax.random.normal(keys[2], (k,)),
    jax.random.normal(keys[3], (k, r)),
    jax.random.normal(keys[4], (r, d)) * 0.1,
  )
  if mode == "float":
    grid = lorap_jax.affine_qparams(-4.0, 4.0, 4, signed=True)
    return s, params, grid, {}
  grid = lorap_jax.affine_qparams(-4.0, 4.0, 8, signed=True)
  codes = lorap_jax.quantize_to_codes(s, grid).astype(jnp.int8)
  extra = {
    "input_scale": grid.scale,
    "input_zero_point": grid.zero_point,
    "output": "codes",
  }
  return codes, params, grid, extra


def prompt_fn(implementation, grid, extra, block_config=None):
  def run(s, params):
    return lorap_jax.kernels.lorap_prompt(
      s,
      *params,
      grid,
      implementation=implementation,
      block_config=block_config,
      **extra,
    )

  return jax.jit(run)


def bytes_moved(s, params) -> int:
  """S read once, S_star (same dtype here) written once, parameters read."""
  return 2 * s.nbytes + sum(p.nbytes for p in params)


def fmt_time(seconds: float | None) -> str:
  if seconds is None:
    return "n/a"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.1f} us"
  return f"{seconds * 1e3:.2f} ms"


def try_time(implementation, s, params, grid, extra, repeats, config=None):
  """Seconds per call, or a reason string when the implementation can't."""
  if implementation in FUSED and not on_gpu():
    return "n/a (CPU)"
  fn = prompt_fn(implementation, grid, extra, config)
  try:
    return time_fn(fn, s, params, repeats=repeats)
  except ExceptionGroup as group:
    reasons = "; ".join(str(e) for e in group.exceptions)
    print(f"<!-- {implementation} declined: {reasons} -->")
    return "n/a"
  except Exception as error:  # A GPU compiler error, raised after dispatch.
    # One failing kernel must not cost the rest of the table.
    first_line = str(error).strip().splitlines()[0] if str(error) else ""
    print(
      f"<!-- {implementation} failed: {type(error).__name__}: {first_line} -->"
    )
    return "error"


def benchmark(shapes, modes, pairs, repeats: int) -> None:
  device = jax.devices()[0]
  bandwidth = copy_bandwidth(repeats)
  print(
    f"Device: {device.device_kind} ({jax.default_backend()}), jax "
    f"{jax.__version__}, {datetime.date.today()}; median of {repeats} calls; "
    f"copy bandwidth {bandwidth / 1e9:.1f} GB/s.\n"
  )
  header = (
    "| n x d | k | r | mode | FP32 layer | XLA prompt | Pallas | Triton "
    "| XLA GB/s | fused GB/s | fused % of copy |"
  )
  print(header)
  print(_separator(header))
  key = jax.random.key(0)
  for name in shapes:
    n, d = SHAPES[name]
    senders, receivers, norm = random_graph(n, key)
    x = jax.random.normal(key, (n, d), jnp.float32)
    w = jax.random.normal(key, (d, d), jnp.float32) / np.sqrt(d)
    layer = time_fn(gcn_layer, x, w, senders, receivers, norm, repeats=repeats)
    del x
    for (k, r), mode in itertools.product(pairs, modes):
      s, params, grid, extra = prompt_inputs(n, d, k, r, mode, key)
      moved = bytes_moved(s, params)
      xla = try_time("xla", s, params, grid, extra, repeats)
      fused = {
        impl: try_time(impl, s, params, grid, extra, repeats) for impl in FUSED
      }
      best = min(
        (t for t in fused.values() if isinstance(t, float)), default=None
      )
      cells = [
        f"{n:,} x {d}",
        str(k),
        str(r),
        mode,
        fmt_time(layer),
        fmt_time(xla),
        *(
          t if isinstance(t, str) else fmt_time(t)
          for t in (fused["pallas"], fused["triton"])
        ),
        f"{moved / xla / 1e9:.1f}",
        "n/a" if best is None else f"{moved / best / 1e9:.1f}",
        "n/a" if best is None else f"{100 * moved / best / bandwidth:.0f}%",
      ]
      print("| " + " | ".join(cells) + " |", flush=True)
      del s


def _separator(header: str) -> str:
  return "|" + "---|" * (header.count("|") - 1)


def tune(shapes, pairs, repeats: int, write: bool) -> None:
  """Times a grid of block configs per shape and fused implementation."""
  if not on_gpu():
    print("--tune needs a GPU: block sizes do not matter in interpret mode.")
    return
  device_kind = jax.devices()[0].device_kind
  candidates = [
    config_lib.BlockConfig(block_n=b, num_warps=w)
    for b, w in itertools.product((16, 32, 64, 128, 256), (2, 4, 8))
  ]
  table = json.loads(config_lib.TUNED_CONFIGS_PATH.read_text() or "{}")
  key = jax.random.key(0)
  for name in shapes:
    n, d = SHAPES[name]
    for (k, r), impl in itertools.product(pairs, FUSED):
      s, params, grid, extra = prompt_inputs(n, d, k, r, "float", key)
      timings = []
      for config in candidates:
        t = try_time(impl, s, params, grid, extra, repeats, config)
        if isinstance(t, float):
          timings.append((t, config))
      if not timings:
        continue
      seconds, best = min(timings, key=lambda pair: pair[0])
      print(f"{impl} n={n} d={d} k={k} r={r}: {best} {fmt_time(seconds)}")
      entries = table.setdefault(device_kind, {}).setdefault(impl, {})
      entries[config_lib.tuned_key(d, k, r)] = best.to_json()
      if write:  # After every entry, so a cut-off run keeps what it timed.
        config_lib.TUNED_CONFIGS_PATH.write_text(
          json.dumps(table, indent=2, sort_keys=True) + "\n"
        )
  if write:
    print(f"wrote {config_lib.TUNED_CONFIGS_PATH}")


def parse_pairs(text: str, parser: argparse.ArgumentParser):
  """'8x4,16x8' -> ((8, 4), (16, 8)); a malformed pair is a usage error."""
  pairs = []
  for item in text.split(","):
    k, sep, r = item.strip().partition("x")
    if not (sep and k.isdigit() and r.isdigit() and int(k) > 0 and int(r) > 0):
      parser.error(f"--kr: {item!r} is not KxR with positive integers")
    pairs.append((int(k), int(r)))
  return tuple(pairs)


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--shapes",
    default=None,
    help="comma-separated subset of cora,arxiv,large (default: all on a GPU, "
    "cora on CPU)",
  )
  parser.add_argument("--modes", default="float,int8")
  parser.add_argument(
    "--kr",
    default=",".join(f"{k}x{r}" for k, r in KR),
    help="comma-separated (k, r) pairs as KxR (default: %(default)s); a "
    "subset keeps a short GPU lease's --tune inside its time",
  )
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--tune", action="store_true")
  parser.add_argument("--write-tuned", action="store_true")
  args = parser.parse_args()
  shapes = (
    args.shapes.split(",")
    if args.shapes
    else (list(SHAPES) if on_gpu() else ["cora"])
  )
  unknown = [s for s in shapes if s not in SHAPES]
  modes = args.modes.split(",")
  unknown += [m for m in modes if m not in MODES]
  if unknown:
    parser.error(f"unknown shapes or modes: {unknown}")
  pairs = parse_pairs(args.kr, parser)
  if args.shapes is None and not on_gpu():
    print("No GPU: Cora only (pass --shapes to run the large ones on CPU).\n")
  if args.tune:
    tune(shapes, pairs, args.repeats, args.write_tuned)
  else:
    benchmark(shapes, modes, pairs, args.repeats)


if __name__ == "__main__":
  main()
