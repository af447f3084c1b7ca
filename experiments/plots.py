"""The README's figures: where LoRAP helps quantized GCN training, and why.

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/plots.py            # full: 10 seeds, 200 epochs
  .venv/bin/python experiments/plots.py --quick    # 2 seeds, 40 epochs

Protocol (every panel): Cora, 2-layer GCN, hidden 64, public split, Adam lr
0.01 (prompts 1e-3), weight decay 5e-4, `train.epochs` epochs; test accuracy
at the epoch of best validation accuracy; mean and sample std over seeds.
LoRAP: k = 10 basis prompts, rank r = 4, unless a panel varies them.

Figures (PNG) and their numbers (CSV of the same name) go to `--out`
(default `experiments/results/plots`, `--quick`: `.../plots-quick`):

- `accuracy_vs_bits`: test accuracy at 2, 4 and 8 bits for plain QAT,
  Degree-Quant and A2Q (A2Q starts at b bits and learns them under a b-bit
  average budget), without and with LoRAP; FP32 as a horizontal band.
  MixQ is left out: it searches its own widths among {2, 4, 8}, so it has
  no fixed bit width to put on this axis (its Cora row is in the README).
- `rank_and_prompts`: rank r in {1, 2, 4, 8} (k = 10) and prompt count k
  in {2, 4, 8, 16} (r = 4), plain QAT + LoRAP at INT2 and INT4, with the
  QAT baseline without a prompt as a dashed line.
- `pre_vs_post`: plain QAT without a prompt, with LoRAP after each
  aggregation ("post", the paper's method) and with the same LoRAP on each
  layer's input before aggregation ("pre", `prompt.position`), at 2/4/8
  bits.
- `aggregation_error`: the mechanism; see `aggregation_errors`.
- `error_structure`: is that error a shift, or low-rank? The share of it
  that a constant shift, a shift per in-degree bucket, a rank-r
  correction (LoRAP's form) or an affine map of the aggregate could
  cancel, against the same error shuffled; see `error_structure`.
  (`experiments/error_cancelling.py` then fits LoRAP to cancel it.)

Every trained configuration is one row of `runs.csv` (per seed); a rerun
reads it and trains only what is missing (`--no-reuse` retrains). The
accuracy panels train through `lorap_jax.run_sweep` (seeds and bit widths
of one structure in one compiled program); the mechanism panel trains with
the jitted `train_step` / `eval_step` to keep the selected states.
"""

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import lorap_jax

BITS = (2, 4, 8)
FRAMEWORKS = ("qat", "dq", "a2q")
RANKS = (1, 2, 4, 8)
NUM_PROMPTS = (2, 4, 8, 16)
ABLATION_BITS = (2, 4)
MECHANISM_BITS = 4
# In-degree buckets (neighbours, self-loop not counted): (low, high), high
# inclusive, None for no upper bound.
DEGREE_BUCKETS = ((0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, None))
# Ranks at which the aggregation error's structure is measured.
STRUCTURE_RANKS = (1, 2, 4, 8)
STRUCTURE_MEASURES = (
  "shift",
  "degree_shift",
  *(f"rank_{r}" for r in STRUCTURE_RANKS),
  *(f"from_aggregate_rank_{r}" for r in STRUCTURE_RANKS),
  "from_aggregate",
)
RUN_FIELDS = ("key", "seed", "best_epoch", "val_acc", "test_acc", "diverged")


@dataclasses.dataclass(frozen=True)
class Protocol:
  seeds: int
  epochs: int


FULL = Protocol(seeds=10, epochs=200)
QUICK = Protocol(seeds=2, epochs=40)


# ---------------------------------------------------------------------------
# Configurations and the run cache.
# ---------------------------------------------------------------------------


def make_config(protocol: Protocol, **overrides):
  """Cora's default config with `overrides` ({"quant.bits": 4, ...})."""
  config = lorap_jax.get_config("cora")
  config.seeds = protocol.seeds
  config.train.epochs = protocol.epochs
  config.checkpoint.enabled = False
  for path, value in overrides.items():
    section, leaf = path.split(".")
    config[section][leaf] = value
  return config


def cell_key(protocol: Protocol, overrides: Mapping) -> str:
  """The cache key of one configuration (without its seed).

  Overrides equal to the default config are left out, so the same run
  reached from two panels (e.g. rank 4 = the default) is trained once.
  """
  default = make_config(protocol)
  changed = {
    path: value
    for path, value in overrides.items()
    if default[path.split(".")[0]][path.split(".")[1]] != value
  }
  return json.dumps({"epochs": protocol.epochs, **changed}, sort_keys=True)


class RunCache:
  """`runs.csv`: one row per trained (configuration, seed).

  `reuse=False` trains again every run asked for, but keeps the rows of
  the others (panels not made this time) in the file.
  """

  def __init__(self, path: pathlib.Path, reuse: bool = True):
    self.path = path
    self.reuse = reuse
    self.rows: dict[tuple[str, int], dict] = {}
    self.trained: set[tuple[str, int]] = set()
    if path.exists():
      with open(path, newline="") as file:
        for row in csv.DictReader(file):
          self.rows[(row["key"], int(row["seed"]))] = row

  def missing(self, key: str, seeds: Iterable[int]) -> list[int]:
    usable = self.rows if self.reuse else self.trained
    return [s for s in seeds if (key, s) not in usable]

  def add(self, key: str, seed: int, **metrics) -> None:
    self.rows[(key, seed)] = {"key": key, "seed": seed, **metrics}
    self.trained.add((key, seed))

  def save(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "w", newline="") as file:
      writer = csv.DictWriter(file, fieldnames=RUN_FIELDS)
      writer.writeheader()
      for key in sorted(self.rows):
        writer.writerow(self.rows[key])

  def test_accuracies(self, key: str, seeds: Iterable[int]) -> np.ndarray:
    return np.asarray(
      [float(self.rows[(key, s)]["test_acc"]) for s in seeds], np.float64
    )


def ensure_trained(
  cache: RunCache,
  protocol: Protocol,
  overrides: Mapping,
  bits: Sequence[int] | None,
) -> None:
  """Trains the seeds x bits of a structure that the cache lacks.

  One `run_sweep` call: the seeds and bit widths are numeric axes of one
  compiled program (Degree-Quant's bits are static and loop inside it).
  """
  seeds = range(protocol.seeds)
  widths = [None] if bits is None else list(bits)
  keys = {
    b: cell_key(
      protocol, overrides if b is None else {**overrides, "quant.bits": b}
    )
    for b in widths
  }
  todo = [b for b in widths if cache.missing(keys[b], seeds)]
  if not todo:
    return
  missing_seeds = sorted(
    {s for b in todo for s in cache.missing(keys[b], seeds)}
  )
  config = make_config(protocol, **overrides)
  grid = {"seed": missing_seeds}
  if bits is not None:
    grid["bits"] = todo
  start = time.perf_counter()
  result = lorap_jax.run_sweep(config, grid)
  for row in result.rows:
    key = keys[None if bits is None else row["bits"]]
    cache.add(
      key,
      int(row["seed"]),
      best_epoch=row["best_epoch"],
      val_acc=row["val_acc"],
      test_acc=row["test_acc"],
      diverged=row["diverged_epoch"],
    )
  cache.save()
  print(
    f"  trained {len(result.rows)} runs of {dict(overrides)} "
    f"in {time.perf_counter() - start:.0f} s",
    flush=True,
  )


def summarize(values: np.ndarray) -> tuple[float, float]:
  """Mean and sample std (ddof 1; 0 for one value), in percent."""
  return lorap_jax.mean_and_std(100.0 * np.asarray(values, np.float64))


def accuracy_row(cache, protocol, overrides, **labels) -> dict:
  key = cell_key(protocol, overrides)
  mean, std = summarize(cache.test_accuracies(key, range(protocol.seeds)))
  return {**labels, "seeds": protocol.seeds, "test_acc": mean, "std": std}


def write_csv(path: pathlib.Path, rows: Sequence[Mapping]) -> None:
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
      writer.writerow(
        {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()}
      )


# ---------------------------------------------------------------------------
# The mechanism: aggregation error per in-degree bucket.
# ---------------------------------------------------------------------------


def in_degrees(senders: np.ndarray, receivers: np.ndarray, n_nodes: int):
  """Neighbours per node (self-loops not counted), int [n_nodes]."""
  keep = np.asarray(senders) != np.asarray(receivers)
  return np.bincount(np.asarray(receivers)[keep], minlength=n_nodes)


def bucket_label(low: int, high: int | None) -> str:
  if high is None:
    return f"{low}+"
  return str(low) if low == high else f"{low}-{high}"


def degree_buckets(degrees: np.ndarray, buckets=DEGREE_BUCKETS) -> np.ndarray:
  """The bucket index of every node, int [n_nodes] (-1: in no bucket)."""
  degrees = np.asarray(degrees)
  index = np.full(degrees.shape, -1, np.int64)
  for b, (low, high) in enumerate(buckets):
    inside = degrees >= low
    if high is not None:
      inside &= degrees <= high
    index[inside & (index < 0)] = b
  return index


def fp32_gcn_aggregate(h, kernel, senders, receivers) -> jax.Array:
  """A_hat (h @ kernel) in float32: GCN's aggregation without quantization.

  A_hat = D^-1/2 (A + I) D^-1/2, as `QuantGCNConv`; h [n_nodes, f], kernel
  [f, d] -> [n_nodes, d].
  """
  n_nodes = h.shape[0]
  senders, receivers = lorap_jax.add_self_loops(senders, receivers, n_nodes)
  norm = lorap_jax.gcn_normalization(senders, receivers, n_nodes)
  xw = h @ kernel
  return jax.ops.segment_sum(
    norm[:, None] * xw[senders], receivers, num_segments=n_nodes
  )


def node_errors(quantized: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """||S_q[i] - S_fp[i]||_2 / mean_j ||S_fp[j]||_2, per node [n_nodes].

  Normalised by the layer's mean row norm (not each row's own), so nodes
  whose full-precision aggregate is nearly zero do not dominate.
  """
  quantized = np.asarray(quantized, np.float64)
  reference = np.asarray(reference, np.float64)
  scale = np.linalg.norm(reference, axis=1).mean()
  return np.linalg.norm(quantized - reference, axis=1) / max(scale, 1e-12)


def bucket_means(values: np.ndarray, index: np.ndarray, n_buckets: int):
  """Mean of `values` per bucket, NaN for an empty bucket, [n_buckets]."""
  out = np.full(n_buckets, np.nan)
  for b in range(n_buckets):
    if np.any(index == b):
      out[b] = float(np.mean(values[index == b]))
  return out


def aggregation_errors(model, variables, graph, bits) -> list[np.ndarray]:
  """Per layer, every node's aggregation quantization error [n_nodes]:
  `node_errors` of each of `aggregate_pairs`."""
  return [
    node_errors(quantized, reference)
    for quantized, reference in aggregate_pairs(model, variables, graph, bits)
  ]


def aggregate_pairs(
  model, variables, graph, bits
) -> list[tuple[np.ndarray, np.ndarray]]:
  """`traced_aggregate_pairs` as numpy arrays."""
  return [
    (np.asarray(quantized), np.asarray(reference))
    for quantized, reference in traced_aggregate_pairs(
      model, variables, graph, bits
    )
  ]


def traced_aggregate_pairs(
  model, variables, graph, bits
) -> list[tuple[jax.Array, jax.Array]]:
  """Per layer, (S_q, S_fp), each [n_nodes, d] (jax arrays: differentiable,
  and usable under `jax.jit`).

  For a trained quantized GCN, layer l, in evaluation mode:
    H_l  = the layer's input as the quantized model computes it (H_0 = X,
           H_1 = ReLU of the quantized first layer's output);
    S_fp = A_hat (H_l W_l): the full-precision aggregation of that input
           with the layer's own (unquantized) weights;
    S_q  = the aggregate the quantized layer passes to its update:
           Q_agg(sum_j Q_msg(a_ij Q_xw(Q_in(H_l) Q_w(W_l))_j)), and with
           LoRAP Q_agg(S_hat + P) after the prompt;
  S_q - S_fp is the aggregation error. The prompt is not trained to match
  S_fp (the backbone trains with it), so this measures how far the
  aggregate the update sees sits from the float aggregation, not a
  training target.
  """
  _, state = model.apply(
    variables,
    graph,
    bits=bits,
    train=False,
    capture_intermediates=lambda module, _: isinstance(
      module, lorap_jax.QuantGCNConv
    ),
    mutable=[lorap_jax.INTERMEDIATES],
  )
  sown = state[lorap_jax.INTERMEDIATES]
  nodes = graph.nodes
  if isinstance(nodes, lorap_jax.SparseFeatures):
    nodes = nodes.to_dense()
  h = nodes
  pairs = []
  for i in range(model.model.num_layers):
    layer = sown[f"conv_{i}"]
    kernel = variables["params"][f"conv_{i}"]["linear"]["kernel"]
    reference = fp32_gcn_aggregate(h, kernel, graph.senders, graph.receivers)
    pairs.append((layer["aggregate"][0], reference))
    h = jax.nn.relu(layer["__call__"][0].nodes)
  return pairs


def error_structure(
  error: np.ndarray,
  groups: np.ndarray,
  aggregate: np.ndarray | None = None,
  ranks: Sequence[int] = STRUCTURE_RANKS,
) -> dict[str, float]:
  """How much of an aggregation error E [n_nodes, d] is structured.

  Fractions of ||E||_F^2 that a correction of each form could cancel at
  best (least squares):
    shift:        one vector added to every node (E's column means; what
                  a single bias or GPF-style prompt could remove);
    degree_shift: one vector per in-degree bucket (`groups`, the bucket
                  index per node): a bias that depends on in-degree only;
    rank_r:       any correction whose rows lie in an r-dimensional space,
                  with per-node coefficients (E's top r singular values).
                  LoRAP's P = (alpha P_A) P_B is of this form (rows in
                  P_B's row space), so this bounds what a rank-r LoRAP
                  could cancel; NaN where r exceeds d.
  With the aggregate S_q the layer's update sees ([n_nodes, d]), also
  `predictable_shares`: what a prompt computed from it could cancel.
  The same measures of `shuffled_structure` say what they give on an
  error without structure across nodes.
  """
  error = np.asarray(error, np.float64)
  total = float(np.sum(error**2))
  if not total > 0:
    raise ValueError(f"the error has no energy to split ({total})")
  out = {"shift": error.shape[0] * float(np.sum(error.mean(0) ** 2)) / total}
  explained = 0.0
  for g in np.unique(groups):
    inside = error[groups == g]
    explained += inside.shape[0] * float(np.sum(inside.mean(0) ** 2))
  out["degree_shift"] = explained / total
  energy = np.cumsum(np.linalg.svd(error, compute_uv=False) ** 2) / total
  for r in ranks:
    out[f"rank_{r}"] = float(energy[r - 1]) if r <= error.shape[1] else np.nan
  if aggregate is not None:
    out.update(predictable_shares(error, aggregate, ranks))
  return out


def predictable_shares(
  error: np.ndarray,
  aggregate: np.ndarray,
  ranks: Sequence[int] = STRUCTURE_RANKS,
  seed: int = 0,
) -> dict[str, float]:
  """Shares of E that an affine map of the aggregate predicts, on nodes
  it was not fitted on.

  LoRAP's prompt is a function of the aggregate, of rank r. Here that
  function is linear: E ~ [S, 1] C, fitted by least squares on one random
  half of the nodes and scored on the other, both ways round (the
  residuals of the two halves summed). `from_aggregate_rank_r` restricts C
  to rank r (reduced-rank regression: the fit projected on the top r
  directions of its fitted values; NaN where r exceeds d),
  `from_aggregate` keeps it whole. Out of sample, a share can be negative.
  """
  error = np.asarray(error, np.float64)
  n_nodes, d = error.shape
  inputs = np.concatenate(
    [np.asarray(aggregate, np.float64), np.ones((n_nodes, 1))], axis=1
  )
  order = np.random.default_rng(seed).permutation(n_nodes)
  halves = (order[: n_nodes // 2], order[n_nodes // 2 :])
  kept = [r for r in ranks if r <= d]
  residual = dict.fromkeys([*kept, d], 0.0)
  for fit_on, score_on in (halves, halves[::-1]):
    coefficients = np.linalg.lstsq(inputs[fit_on], error[fit_on], rcond=None)[0]
    directions = np.linalg.svd(
      inputs[fit_on] @ coefficients, full_matrices=False
    )[2]
    for r in residual:
      projected = coefficients @ directions[:r].T @ directions[:r]
      misfit = error[score_on] - inputs[score_on] @ projected
      residual[r] += float(np.sum(misfit**2))
  total = float(np.sum(error**2))
  out = {
    f"from_aggregate_rank_{r}": 1.0 - residual[r] / total if r <= d else np.nan
    for r in ranks
  }
  out["from_aggregate"] = 1.0 - residual[d] / total
  return out


def shuffled_structure(
  error: np.ndarray,
  groups: np.ndarray,
  aggregate: np.ndarray | None = None,
  *,
  seed: int = 0,
  **kwargs,
) -> dict[str, float]:
  """`error_structure` of E with each column permuted over the nodes on
  its own: the same column means and spreads, no structure across nodes or
  between columns (the null the fractions are read against)."""
  rng = np.random.default_rng(seed)
  error = np.asarray(error, np.float64)
  shuffled = np.stack([rng.permutation(column) for column in error.T], 1)
  return error_structure(shuffled, groups, aggregate, **kwargs)


def train_selected(config, dataset, seed: int, make_step=None):
  """Trains one run with the jitted steps; the best-validation state.

  `make_step(model)` gives another step of `lorap_jax.train_step`'s
  signature (state, batch, rng) -> (state, metrics), e.g. with another
  loss; by default `lorap_jax.train_step`.
  """
  model = lorap_jax.create_model(
    config, num_classes=dataset.num_classes, task="node"
  )
  step = lorap_jax.train_step if make_step is None else make_step(model)
  features = np.asarray(dataset.graph.nodes, np.float32)
  graph = jax.device_put(
    dataset.graph._replace(nodes=lorap_jax.SparseFeatures.from_dense(features))
  )
  masks = {
    "train": dataset.train_mask,
    "val": dataset.val_mask,
    "test": dataset.test_mask,
  }
  labels = jnp.asarray(dataset.labels)
  eval_batch = lorap_jax.EvalBatch(graph, labels, jax.device_put(masks))
  batch = lorap_jax.Batch(graph, labels, eval_batch.masks["train"])
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  state = lorap_jax.create_train_state(
    model,
    lorap_jax.create_optimizer(config),
    graph,
    init_key,
    config.quant.bits,
  )
  best, best_val = state, -1
  for epoch in range(config.train.epochs):
    rng = jax.random.fold_in(dropout_key, epoch)
    state, _ = step(state, batch, rng)
    val = int(lorap_jax.eval_step(state, eval_batch)["val"]["correct"])
    if val > best_val:
      best, best_val = state, val
  return model, best, graph


def _cached_rows(path: pathlib.Path, epochs: int, reuse: bool) -> list[dict]:
  if not (reuse and path.exists()):
    return []
  with open(path, newline="") as file:
    return [r for r in csv.DictReader(file) if int(r["epochs"]) == epochs]


def mechanism(protocol: Protocol, out: pathlib.Path, reuse: bool):
  """Per seed and layer: the mean aggregation error per in-degree bucket,
  and the error's structure (`error_structure`, and on shuffled errors),
  from the same trained models; two cached CSVs, a seed trained again
  where either lacks it. Returns (error rows, structure rows)."""
  error_path = out / "aggregation_error_runs.csv"
  structure_path = out / "error_structure_runs.csv"
  errors = _cached_rows(error_path, protocol.epochs, reuse)
  structures = [  # Rows of an older set of measures count as missing.
    r
    for r in _cached_rows(structure_path, protocol.epochs, reuse)
    if all(m in r for m in STRUCTURE_MEASURES)
  ]

  def runs(rows):
    return {(r["prompt"], int(r["seed"])) for r in rows}

  finished = runs(errors) & runs(structures)
  dataset = lorap_jax.load_dataset("cora", os.environ.get("LORAP_DATA_DIR"))
  degrees = in_degrees(
    dataset.graph.senders, dataset.graph.receivers, dataset.labels.shape[0]
  )
  index = degree_buckets(degrees)
  for prompt in ("none", "lorap"):
    config = make_config(
      protocol, **{"quant.bits": MECHANISM_BITS, "prompt.kind": prompt}
    )
    for seed in range(protocol.seeds):
      if (prompt, seed) in finished:
        continue
      model, state, graph = train_selected(config, dataset, seed)
      pairs = aggregate_pairs(model, state.variables(), graph, state.bits)
      errors = [
        r for r in errors if (r["prompt"], int(r["seed"])) != (prompt, seed)
      ]
      structures = [
        r for r in structures if (r["prompt"], int(r["seed"])) != (prompt, seed)
      ]
      run = {"prompt": prompt, "seed": seed, "epochs": protocol.epochs}
      for layer, (quantized, reference) in enumerate(pairs):
        means = bucket_means(
          node_errors(quantized, reference), index, len(DEGREE_BUCKETS)
        )
        for b, (low, high) in enumerate(DEGREE_BUCKETS):
          errors.append(
            {
              **run,
              "layer": layer,
              "bucket": bucket_label(low, high),
              "nodes": int(np.sum(index == b)),
              "error": float(means[b]),
            }
          )
        error = quantized.astype(np.float64) - reference
        # ||E||^2 / ||S_fp||^2: how large the error is against the aggregate.
        relative = float(
          np.sum(error**2) / np.sum(reference.astype(np.float64) ** 2)
        )
        for source, measure in (
          ("error", error_structure),
          ("shuffled", shuffled_structure),
        ):
          structures.append(
            {
              **run,
              "layer": layer,
              "source": source,
              "relative_energy": relative,
              **measure(error, index, quantized),
            }
          )
      write_csv(error_path, errors)
      write_csv(structure_path, structures)
      print(f"  mechanism: {prompt} seed {seed} done", flush=True)
  return errors, structures


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _fp32_band(axis, fp32: Mapping) -> None:
  mean, std = fp32["test_acc"], fp32["std"]
  axis.axhline(mean, color="black", lw=1, label=f"FP32 {mean:.1f}")
  axis.axhspan(mean - std, mean + std, color="black", alpha=0.08)


def plot_accuracy_vs_bits(rows, fp32, path: pathlib.Path, seeds: int):
  plt = _pyplot()
  names = {"qat": "plain QAT", "dq": "Degree-Quant", "a2q": "A2Q"}
  fig, axes = plt.subplots(1, len(FRAMEWORKS), figsize=(12, 3.8), sharey=True)
  for axis, framework in zip(axes, FRAMEWORKS, strict=True):
    for prompt, style in (("none", "o-"), ("lorap", "s--")):
      cells = [
        r for r in rows if r["framework"] == framework and r["prompt"] == prompt
      ]
      axis.errorbar(
        [r["bits"] for r in cells],
        [r["test_acc"] for r in cells],
        yerr=[r["std"] for r in cells],
        fmt=style,
        capsize=3,
        label="+ LoRAP" if prompt == "lorap" else "no prompt",
      )
    _fp32_band(axis, fp32)
    axis.set_title(names[framework])
    axis.set_xscale("log", base=2)
    axis.set_xticks(BITS, [str(b) for b in BITS])
    axis.set_xlabel("bits")
    axis.grid(alpha=0.3)
  axes[0].set_ylabel(f"test accuracy % (mean ± std, {seeds} seeds)")
  axes[0].legend(loc="lower right")
  fig.suptitle("Cora GCN: accuracy vs bit width, without and with LoRAP")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_rank_and_prompts(rows, baselines, path: pathlib.Path, seeds: int):
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  for axis, axis_name, values, label in (
    (axes[0], "rank", RANKS, "rank r (k = 10)"),
    (axes[1], "num_prompts", NUM_PROMPTS, "prompts k (r = 4)"),
  ):
    for i, bits in enumerate(ABLATION_BITS):
      cells = [r for r in rows if r["axis"] == axis_name and r["bits"] == bits]
      color = f"C{i}"
      axis.errorbar(
        [r["value"] for r in cells],
        [r["test_acc"] for r in cells],
        yerr=[r["std"] for r in cells],
        fmt="o-",
        color=color,
        capsize=3,
        label=f"INT{bits} QAT + LoRAP",
      )
      axis.axhline(
        baselines[bits]["test_acc"],
        color=color,
        ls=":",
        label=f"INT{bits} QAT, no prompt",
      )
    axis.set_xscale("log", base=2)
    axis.set_xticks(values, [str(v) for v in values])
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)
  axes[0].set_ylabel(f"test accuracy % (mean ± std, {seeds} seeds)")
  axes[0].legend(fontsize=8)
  fig.suptitle("Cora GCN, plain QAT + LoRAP: rank and prompt-count ablations")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_pre_vs_post(rows, fp32, path: pathlib.Path, seeds: int):
  plt = _pyplot()
  fig, axis = plt.subplots(figsize=(5.5, 3.8))
  labels = {
    "none": "no prompt",
    "post": "LoRAP after aggregation (post)",
    "pre": "LoRAP on the layer input (pre)",
  }
  for i, (variant, label) in enumerate(labels.items()):
    cells = [r for r in rows if r["variant"] == variant]
    axis.errorbar(
      [r["bits"] * (1 + 0.04 * (i - 1)) for r in cells],
      [r["test_acc"] for r in cells],
      yerr=[r["std"] for r in cells],
      fmt="o-",
      capsize=3,
      label=label,
    )
  _fp32_band(axis, fp32)
  axis.set_xscale("log", base=2)
  axis.set_xticks(BITS, [str(b) for b in BITS])
  axis.set_xlabel("bits (plain QAT)")
  axis.set_ylabel(f"test accuracy % ({seeds} seeds)")
  axis.legend(fontsize=8)
  axis.grid(alpha=0.3)
  axis.set_title("Cora GCN: pre- vs post-aggregation prompting")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _seed_bars(axis, x, stats, width, **style) -> None:
  """Bars of (mean, std) pairs over seeds, the stds as error bars."""
  means, stds = zip(*stats, strict=True)
  axis.bar(x, means, width, yerr=stds, **style)


def plot_aggregation_error(rows, path: pathlib.Path, seeds: int):
  plt = _pyplot()
  layers = sorted({int(r["layer"]) for r in rows})
  labels = [bucket_label(*b) for b in DEGREE_BUCKETS]
  present = [lab for lab in labels if any(r["bucket"] == lab for r in rows)]
  present = [
    lab
    for lab in present
    if any(int(r["nodes"]) > 0 for r in rows if r["bucket"] == lab)
  ]
  fig, axes = plt.subplots(1, len(layers), figsize=(10, 3.8))
  x = np.arange(len(present))
  for axis, layer in zip(np.atleast_1d(axes), layers, strict=True):
    for j, prompt in enumerate(("none", "lorap")):
      stats = [
        _seed_stats(rows, prompt=prompt, layer=layer, bucket=lab)
        for lab in present
      ]
      _seed_bars(
        axis,
        x + (j - 0.5) * 0.38,
        stats,
        0.38,
        capsize=3,
        label="INT4 QAT + LoRAP" if prompt == "lorap" else "INT4 QAT",
      )
    nodes = {
      lab: next(int(r["nodes"]) for r in rows if r["bucket"] == lab)
      for lab in present
    }
    axis.set_xticks(x, [f"{lab}\n({nodes[lab]})" for lab in present])
    axis.set_xlabel("in-degree (nodes)")
    axis.set_title(f"layer {layer + 1}")
    axis.grid(alpha=0.3, axis="y")
  np.atleast_1d(axes)[0].set_ylabel(
    "||S_q - S_fp|| / mean ||S_fp||" + f" ({seeds} seeds)"
  )
  np.atleast_1d(axes)[0].legend(fontsize=8)
  fig.suptitle("Cora GCN INT4: aggregation error per in-degree bucket")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _seed_stats(rows, column: str = "error", **where) -> tuple[float, float]:
  """Mean and std over the rows (seeds) that match `where`, of `column`."""
  values = np.asarray(
    [
      float(r[column])
      for r in rows
      if all(str(r[k]) == str(v) for k, v in where.items())
    ],
    np.float64,
  )
  values = values[np.isfinite(values)]
  if values.size == 0:
    return float("nan"), float("nan")
  return lorap_jax.mean_and_std(values)


def aggregation_error_summary(rows) -> list[dict]:
  out = []
  for prompt in ("none", "lorap"):
    for layer in sorted({int(r["layer"]) for r in rows}):
      for low, high in DEGREE_BUCKETS:
        label = bucket_label(low, high)
        cells = [
          r for r in rows if r["bucket"] == label and int(r["layer"]) == layer
        ]
        if not cells or int(cells[0]["nodes"]) == 0:
          continue
        mean, std = _seed_stats(rows, prompt=prompt, layer=layer, bucket=label)
        out.append(
          {
            "prompt": prompt,
            "layer": layer + 1,
            "in_degree": label,
            "nodes": int(cells[0]["nodes"]),
            "error_mean": mean,
            "error_std": std,
          }
        )
  return out


def error_structure_summary(rows) -> list[dict]:
  """Mean and std over seeds of every structure measure, per prompt, layer
  and source (the error, or its shuffled null)."""
  out = []
  for prompt in ("none", "lorap"):
    for layer in sorted({int(r["layer"]) for r in rows}):
      for source in ("error", "shuffled"):
        where = {"prompt": prompt, "layer": layer, "source": source}
        seeds = sum(
          all(str(r[k]) == str(v) for k, v in where.items()) for r in rows
        )
        if not seeds:
          continue
        row = {
          "prompt": prompt,
          "layer": layer + 1,
          "source": source,
          "seeds": seeds,
        }
        for column in ("relative_energy", *STRUCTURE_MEASURES):
          mean, std = _seed_stats(rows, column, **where)
          row[f"{column}_mean"], row[f"{column}_std"] = mean, std
        out.append(row)
  return out


def plot_error_structure(rows, path: pathlib.Path, seeds: int):
  plt = _pyplot()
  layers = sorted({int(r["layer"]) for r in rows})
  fig, axes = plt.subplots(len(layers), 1, figsize=(11, 3.4 * len(layers)))
  labels = [
    "from S\nfull rank"
    if m == "from_aggregate"
    else m.replace("from_aggregate", "from S")
    .replace("_rank_", "\nrank ")
    .replace("_", " ")
    for m in STRUCTURE_MEASURES
  ]
  x = np.arange(len(labels))
  bars = (
    ("none", "error", "INT4 QAT"),
    ("lorap", "error", "INT4 QAT + LoRAP"),
    ("none", "shuffled", "INT4 QAT, error shuffled per column"),
  )
  for axis, layer in zip(np.atleast_1d(axes), layers, strict=True):
    for j, (prompt, source, label) in enumerate(bars):
      stats = [
        _seed_stats(rows, m, prompt=prompt, layer=layer, source=source)
        for m in STRUCTURE_MEASURES
      ]
      _seed_bars(
        axis,
        x + (j - 1) * 0.27,
        stats,
        0.27,
        capsize=2,
        label=label,
        color="0.7" if source == "shuffled" else None,
      )
    axis.set_xticks(x, labels, fontsize=8)
    axis.set_ylim(top=1)  # Out-of-sample shares can fall below 0.
    axis.axhline(0, color="black", lw=0.8)
    axis.set_title(f"layer {layer + 1}")
    axis.grid(alpha=0.3, axis="y")
  np.atleast_1d(axes)[0].set_ylabel(
    f"share of ||S_q - S_fp||^2 ({seeds} seeds)"
  )
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.suptitle(
    "Cora GCN INT4: the share of the aggregation error that a shift, any "
    "rank-r correction, or an affine map of the aggregate S could cancel"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 seeds, 40 epochs")
  parser.add_argument("--out", type=pathlib.Path, help="output directory")
  parser.add_argument("--seeds", type=int, help="override the seed count")
  parser.add_argument("--epochs", type=int, help="override the epochs")
  parser.add_argument(
    "--no-reuse", action="store_true", help="retrain cached runs"
  )
  parser.add_argument(
    "--only",
    default="bits,ablation,position,mechanism",
    help="comma-separated panels to make",
  )
  args = parser.parse_args(argv)
  protocol = QUICK if args.quick else FULL
  protocol = Protocol(
    seeds=args.seeds or protocol.seeds, epochs=args.epochs or protocol.epochs
  )
  here = pathlib.Path(__file__).resolve().parent
  out = args.out or here / "results" / (
    "plots-quick" if args.quick else "plots"
  )
  out.mkdir(parents=True, exist_ok=True)
  reuse = not args.no_reuse
  only = set(args.only.split(","))
  cache = RunCache(out / "runs.csv", reuse=reuse)
  start = time.perf_counter()
  print(f"protocol {protocol}, output {out}", flush=True)

  fp32_overrides = {"quant.framework": "fp32", "prompt.kind": "none"}
  if only & {"bits", "position"}:  # The panels with an FP32 band.
    ensure_trained(cache, protocol, fp32_overrides, None)
    fp32 = accuracy_row(cache, protocol, fp32_overrides, setting="fp32")

  def framework_overrides(framework, prompt, bits=None):
    overrides = {"quant.framework": framework, "prompt.kind": prompt}
    if framework == "a2q" and bits is not None:
      overrides["a2q.target_average_bits"] = float(bits)
    return overrides

  if "bits" in only or "position" in only or "ablation" in only:
    for framework in FRAMEWORKS if "bits" in only else ("qat",):
      for prompt in ("none", "lorap"):
        if framework == "a2q":  # Its budget follows the bits: static.
          for b in BITS:
            ensure_trained(
              cache, protocol, framework_overrides(framework, prompt, b), [b]
            )
        else:
          ensure_trained(
            cache, protocol, framework_overrides(framework, prompt), BITS
          )
  if "bits" in only:
    rows = [
      accuracy_row(
        cache,
        protocol,
        {**framework_overrides(framework, prompt, b), "quant.bits": b},
        framework=framework,
        prompt=prompt,
        bits=b,
      )
      for framework in FRAMEWORKS
      for prompt in ("none", "lorap")
      for b in BITS
    ]
    fp32_row = {"framework": "fp32", "prompt": "none", "bits": 32}
    fp32_row.update({k: fp32[k] for k in ("seeds", "test_acc", "std")})
    write_csv(out / "accuracy_vs_bits.csv", [*rows, fp32_row])
    plot_accuracy_vs_bits(
      rows, fp32, out / "accuracy_vs_bits.png", protocol.seeds
    )

  if "ablation" in only:
    base = {"quant.framework": "qat", "prompt.kind": "lorap"}
    for rank in RANKS:
      ensure_trained(
        cache, protocol, {**base, "prompt.rank": rank}, ABLATION_BITS
      )
    for k in NUM_PROMPTS:
      ensure_trained(
        cache, protocol, {**base, "prompt.num_prompts": k}, ABLATION_BITS
      )
    rows = []
    for axis_name, field, values in (
      ("rank", "prompt.rank", RANKS),
      ("num_prompts", "prompt.num_prompts", NUM_PROMPTS),
    ):
      for b in ABLATION_BITS:
        for value in values:
          overrides = {**base, field: value, "quant.bits": b}
          rows.append(
            accuracy_row(
              cache, protocol, overrides, axis=axis_name, value=value, bits=b
            )
          )
    baselines = {
      b: accuracy_row(
        cache,
        protocol,
        {**framework_overrides("qat", "none"), "quant.bits": b},
        axis="none",
        value=0,
        bits=b,
      )
      for b in ABLATION_BITS
    }
    write_csv(out / "rank_and_prompts.csv", rows + list(baselines.values()))
    plot_rank_and_prompts(
      rows, baselines, out / "rank_and_prompts.png", protocol.seeds
    )

  if "position" in only:
    pre = {
      "quant.framework": "qat",
      "prompt.kind": "lorap",
      "prompt.position": "pre",
    }
    ensure_trained(cache, protocol, pre, BITS)
    variants = {
      "none": framework_overrides("qat", "none"),
      "post": framework_overrides("qat", "lorap"),
      "pre": pre,
    }
    rows = [
      accuracy_row(
        cache,
        protocol,
        {**overrides, "quant.bits": b},
        variant=variant,
        bits=b,
      )
      for variant, overrides in variants.items()
      for b in BITS
    ]
    write_csv(out / "pre_vs_post.csv", rows)
    plot_pre_vs_post(rows, fp32, out / "pre_vs_post.png", protocol.seeds)

  if "mechanism" in only:
    errors, structures = mechanism(protocol, out, reuse)
    write_csv(out / "aggregation_error.csv", aggregation_error_summary(errors))
    plot_aggregation_error(
      errors, out / "aggregation_error.png", protocol.seeds
    )
    write_csv(out / "error_structure.csv", error_structure_summary(structures))
    plot_error_structure(
      structures, out / "error_structure.png", protocol.seeds
    )
  print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  sys.exit(main())
