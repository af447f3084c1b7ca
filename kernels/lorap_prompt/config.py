"""Launch parameters of the fused LoRAP prompt kernels.

The op is row-wise: one program owns `block_n` whole rows of S ([block_n, d]
in registers), computes their logits, softmax and prompt, and writes the same
rows of S_star. Nothing crosses blocks, so `block_n` only trades registers
per program against the number of programs (occupancy), and the kernel stays
bound by memory traffic (lorap.md, section 5).

Tuned values, when someone has measured them on a GPU, are checked in as
`tuned_configs.json` next to this file, keyed by device kind (as
`jax.Device.device_kind` spells it), then implementation, then
`"d=<d>,k=<k>,r=<r>"`; `experiments/benchmark_kernel.py --tune` writes them.
Without an entry, `get_default` falls back to the heuristic.
"""

import dataclasses
import functools
import json
import pathlib

TUNED_CONFIGS_PATH = pathlib.Path(__file__).with_name("tuned_configs.json")
# A device kind's entry may also hold this key: the implementations `"auto"`
# tries there, fastest first, where `experiments/benchmark_kernel.py`
# measured the specified order to be slower (kernels/README.md, "GPU").
AUTO_ORDER_KEY = "auto_order"

# Triton's tl.dot needs every matrix dimension >= 16.
MIN_BLOCK = 16
# Elements of S per program: 8192 float32 are 32 KiB of registers spread over
# 4 warps (64 per thread), which leaves room for the prompt tile and the
# quantizer without spilling.
_TARGET_BLOCK_ELEMENTS = 8192
_MAX_BLOCK_N = 256


def next_power_of_2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def padded(x: int) -> int:
  """A matrix dimension padded for tl.dot: a power of two, at least 16."""
  return max(MIN_BLOCK, next_power_of_2(x))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockConfig:
  """Launch parameters of one fused-prompt call (static, hashable).

  Attributes:
    block_n: rows of S per program; a power of two >= 16 (tl.dot's minimum).
    num_warps: warps per program (GPU only).
    num_stages: software-pipelining stages (GPU only; the kernel has no loop,
      so 1 is the natural value).
  """

  block_n: int = 128
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    block_n = self.block_n
    if (
      not isinstance(block_n, int)
      or block_n < MIN_BLOCK
      or block_n != next_power_of_2(block_n)
    ):
      raise ValueError(f"{block_n=} must be a power of two >= {MIN_BLOCK}")
    num_warps = self.num_warps
    if num_warps not in (1, 2, 4, 8, 16, 32):
      raise ValueError(f"{num_warps=} must be a power of two in 1..32")
    num_stages = self.num_stages
    if not isinstance(num_stages, int) or num_stages < 1:
      raise ValueError(f"{num_stages=} must be an integer >= 1")

  def to_json(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def tuned_key(d: int, k: int, r: int) -> str:
  """The key of a (d, k, r) entry in the tuned-configs JSON."""
  return f"d={d},k={k},r={r}"


@functools.cache
def _read_table(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def load_tuned_configs(
  path: pathlib.Path = TUNED_CONFIGS_PATH,
) -> dict[str, dict[str, dict[str, BlockConfig]]]:
  """Tuned configs, {device_kind: {implementation: {key: BlockConfig}}}.

  Args:
    path: the JSON file; a missing file means no tuned values.

  Returns:
    The parsed table (the file is read once per process).
  """
  return {
    device: {
      impl: {key: BlockConfig(**value) for key, value in entries.items()}
      for impl, entries in implementations.items()
      if impl != AUTO_ORDER_KEY
    }
    for device, implementations in _read_table(path).items()
  }


def measured_auto_order(
  device_kind: str, path: pathlib.Path = TUNED_CONFIGS_PATH
) -> tuple[str, ...] | None:
  """The order `"auto"` tries on this device kind, where one was measured.

  Args:
    device_kind: `jax.Device.device_kind`.
    path: the JSON file.

  Returns:
    The device entry's `"auto_order"` (implementation names, fastest
    first), or None where there is none.
  """
  order = _read_table(path).get(device_kind, {}).get(AUTO_ORDER_KEY)
  return None if order is None else tuple(order)


def heuristic(n: int, d: int) -> BlockConfig:
  """Block sizes from the shape alone.

  Args:
    n: number of nodes (rows of S).
    d: feature width.

  Returns:
    About `_TARGET_BLOCK_ELEMENTS` elements of S per program, never more rows
    than the (padded) graph has, and 8 warps for tiles larger than that.
  """
  d_pad = padded(d)
  # Both are powers of two, so the quotient is one too (or 0 for huge d).
  block_n = max(MIN_BLOCK, min(_MAX_BLOCK_N, _TARGET_BLOCK_ELEMENTS // d_pad))
  block_n = min(block_n, max(MIN_BLOCK, next_power_of_2(n)))
  num_warps = 4 if block_n * d_pad <= _TARGET_BLOCK_ELEMENTS else 8
  return BlockConfig(block_n=block_n, num_warps=num_warps, num_stages=1)


def get_default(
  n: int,
  d: int,
  k: int,
  r: int,
  device_kind: str | None = None,
  *,
  implementation: str = "triton",
) -> BlockConfig:
  """The block config for a shape: the tuned entry if any, else the heuristic.

  Args:
    n: number of nodes.
    d: feature width.
    k: number of basis prompts.
    r: rank of the basis.
    device_kind: `jax.Device.device_kind` of the target; None skips the
      tuned table.
    implementation: "triton" or "pallas" (tuned separately).

  Returns:
    A `BlockConfig`.

  Examples:
    >>> get_default(2708, 64, 8, 4)
    BlockConfig(block_n=128, num_warps=4, num_stages=1)
    >>> get_default(37, 16, 4, 2).block_n  # no more rows than the graph
    64
  """
  if device_kind is not None:
    tuned = load_tuned_configs().get(device_kind, {}).get(implementation, {})
    entry = tuned.get(tuned_key(d, k, r))
    if entry is not None:
      return entry
  return heuristic(n, d)
