"""Tests of experiments/plots.py (its pure functions and figures) and of
experiments/notebook_example.py (run end to end on a small epoch count)."""

import importlib.util
import os
import pathlib
import runpy

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

import lorap_jax

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load_plots():
  spec = importlib.util.spec_from_file_location(
    "plots_script", EXPERIMENTS / "plots.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


plots = _load_plots()


def _graph(n=9, features=4, seed=0):
  # A star around node 0 (in-degree 6) plus a path 6-7-8 and a self-loop.
  pairs = [(0, i) for i in range(1, 7)] + [(6, 7), (7, 8)]
  senders = [s for s, r in pairs] + [r for s, r in pairs] + [3]
  receivers = [r for s, r in pairs] + [s for s, r in pairs] + [3]
  nodes = np.random.default_rng(seed).normal(size=(n, features))
  return jraph.GraphsTuple(
    nodes=jnp.asarray(nodes, jnp.float32),
    edges=None,
    senders=jnp.asarray(senders, jnp.int32),
    receivers=jnp.asarray(receivers, jnp.int32),
    n_node=jnp.asarray([n], jnp.int32),
    n_edge=jnp.asarray([len(senders)], jnp.int32),
    globals=None,
  )


def test_in_degrees_and_buckets():
  graph = _graph()
  degrees = plots.in_degrees(graph.senders, graph.receivers, 9)
  # Node 3's self-loop does not count.
  np.testing.assert_array_equal(degrees, [6, 1, 1, 1, 1, 1, 2, 2, 1])
  index = plots.degree_buckets(np.array([0, 1, 2, 3, 4, 7, 8, 15, 16, 100]))
  # Buckets: 0, 1, 2-3, 4-7, 8-15, 16+.
  np.testing.assert_array_equal(index, [0, 1, 2, 2, 3, 3, 4, 4, 5, 5])
  labels = [plots.bucket_label(*b) for b in plots.DEGREE_BUCKETS]
  assert labels == ["0", "1", "2-3", "4-7", "8-15", "16+"]
  means = plots.bucket_means(np.arange(4.0), np.array([1, 1, 3, -1]), 5)
  np.testing.assert_array_equal(means, [np.nan, 0.5, np.nan, 2.0, np.nan])


def test_error_measure_matches_numpy():
  graph = _graph()
  rng = np.random.default_rng(1)
  h = np.asarray(graph.nodes, np.float64)
  kernel = rng.normal(size=(4, 3))
  # A_hat = D^-1/2 (A + I) D^-1/2 of the graph without its self-loop.
  a = np.eye(9)
  for s, r in zip(graph.senders, graph.receivers, strict=True):
    if s != r:
      a[int(r), int(s)] += 1
  d = 1 / np.sqrt(a.sum(1))
  want = (d[:, None] * a * d[None]) @ h @ kernel
  no_loop = np.asarray(graph.senders) != np.asarray(graph.receivers)
  got = plots.fp32_gcn_aggregate(
    jnp.asarray(h, jnp.float32),
    jnp.asarray(kernel, jnp.float32),
    graph.senders[no_loop],
    graph.receivers[no_loop],
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  quantized = want + rng.normal(size=want.shape) * 0.1
  errors = plots.node_errors(quantized, want)
  scale = np.mean([np.sqrt(np.sum(row**2)) for row in want])
  for i in range(9):
    diff = np.sqrt(np.sum((quantized[i] - want[i]) ** 2))
    assert errors[i] == pytest.approx(diff / scale, rel=1e-9)


@pytest.mark.parametrize("prompt", ["none", "lorap"])
def test_aggregation_errors_zero_in_fp32_positive_quantized(prompt):
  graph = _graph()
  no_loop = np.asarray(graph.senders) != np.asarray(graph.receivers)
  graph = graph._replace(
    senders=graph.senders[no_loop], receivers=graph.receivers[no_loop]
  )
  errors = {}
  for name, quant, bits in (
    ("fp32", lorap_jax.FP32, None),
    ("int4", lorap_jax.QuantConfig(), 4.0),
  ):
    model = lorap_jax.GNN(
      model=lorap_jax.ModelConfig(num_classes=3, hidden=5),
      quant=quant,
      # glorot: a prompt that acts from the start, as a trained one does.
      prompt=lorap_jax.PromptConfig(
        kind=prompt, num_prompts=2, rank=2, init="glorot"
      ),
    )
    variables = model.init(jax.random.key(0), graph, bits=bits)
    errors[name] = plots.aggregation_errors(model, variables, graph, bits)
  assert len(errors["int4"]) == 2
  for layer in range(2):
    assert errors["int4"][layer].shape == (9,)
    assert np.all(errors["int4"][layer] >= 0)
    if prompt == "none":  # FP32 without a prompt is S_fp itself.
      np.testing.assert_allclose(errors["fp32"][layer], 0.0, atol=1e-6)
    else:  # The prompt moves the aggregate away from A_hat H W.
      assert errors["fp32"][layer].max() > 1e-3
    assert errors["int4"][layer].mean() > 1e-3


def test_cell_key_and_cache(tmp_path):
  protocol = plots.Protocol(seeds=2, epochs=5)
  # Overrides equal to the default config do not change the key.
  assert plots.cell_key(protocol, {"prompt.rank": 4}) == plots.cell_key(
    protocol, {}
  )
  assert plots.cell_key(protocol, {"prompt.rank": 2}) != plots.cell_key(
    protocol, {}
  )
  key = plots.cell_key(protocol, {"quant.bits": 2})
  cache = plots.RunCache(tmp_path / "runs.csv")
  assert cache.missing(key, range(2)) == [0, 1]
  cache.add(key, 0, best_epoch=3, val_acc=0.5, test_acc=0.6, diverged=-1)
  cache.save()
  reread = plots.RunCache(tmp_path / "runs.csv")
  assert reread.missing(key, range(2)) == [1]
  np.testing.assert_array_equal(reread.test_accuracies(key, [0]), [0.6])
  assert plots.RunCache(tmp_path / "runs.csv", reuse=False).rows == {}
  assert plots.summarize(np.array([0.5, 0.7])) == pytest.approx(
    (60.0, np.std([50.0, 70.0], ddof=1))
  )


def test_figures_are_written(tmp_path):
  pytest.importorskip("matplotlib")
  fp32 = {"test_acc": 81.0, "std": 0.5}
  rows = [
    {"framework": f, "prompt": p, "bits": b, "test_acc": 70.0 + b, "std": 1.0}
    for f in plots.FRAMEWORKS
    for p in ("none", "lorap")
    for b in plots.BITS
  ]
  plots.plot_accuracy_vs_bits(rows, fp32, tmp_path / "a.png", 2)
  ablation = [
    {"axis": axis, "value": v, "bits": b, "test_acc": 70.0, "std": 1.0}
    for axis, values in (
      ("rank", plots.RANKS),
      ("num_prompts", plots.NUM_PROMPTS),
    )
    for v in values
    for b in plots.ABLATION_BITS
  ]
  baselines = {b: {"test_acc": 69.0} for b in plots.ABLATION_BITS}
  plots.plot_rank_and_prompts(ablation, baselines, tmp_path / "b.png", 2)
  position = [
    {"variant": v, "bits": b, "test_acc": 70.0, "std": 1.0}
    for v in ("none", "post", "pre")
    for b in plots.BITS
  ]
  plots.plot_pre_vs_post(position, fp32, tmp_path / "c.png", 2)
  errors = [
    {
      "prompt": p,
      "seed": s,
      "layer": layer,
      "bucket": plots.bucket_label(*b),
      "nodes": 0 if b == (0, 0) else 10,
      "error": 0.1 * (s + 1),
    }
    for p in ("none", "lorap")
    for s in range(2)
    for layer in range(2)
    for b in plots.DEGREE_BUCKETS
  ]
  plots.plot_aggregation_error(errors, tmp_path / "d.png", 2)
  summary = plots.aggregation_error_summary(errors)
  assert {r["in_degree"] for r in summary} == {"1", "2-3", "4-7", "8-15", "16+"}
  assert summary[0]["error_mean"] == pytest.approx(0.15)
  for name in "abcd":
    assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_notebook_example_runs(data_dir, tmp_path, monkeypatch):
  pytest.importorskip("matplotlib")
  png = tmp_path / "curve.png"
  monkeypatch.setenv("LORAP_DATA_DIR", os.fspath(data_dir))
  monkeypatch.setenv("LORAP_EXAMPLE_EPOCHS", "40")
  monkeypatch.setenv("LORAP_EXAMPLE_PNG", os.fspath(png))
  result = runpy.run_path(os.fspath(EXPERIMENTS / "notebook_example.py"))
  assert png.stat().st_size > 5000
  assert len(result["history"]["loss"]) == 40
  # Cora's majority class is ~30% of the test set; 40 epochs of INT4 QAT +
  # LoRAP get well beyond it.
  assert result["best"]["test"] > 0.6
  assert result["history"]["loss"][-1] < result["history"]["loss"][0]
