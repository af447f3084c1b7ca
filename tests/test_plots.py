"""Tests of experiments/plots.py (its pure functions and figures) and of
experiments/notebook_example.py (run end to end on a small epoch count)."""

import functools
import importlib.util
import os
import pathlib
import runpy

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
import pytest

import lorap_jax

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load_script(name: str):
  """An `experiments/` script as a module (they are not a package)."""
  spec = importlib.util.spec_from_file_location(
    f"{name}_script", EXPERIMENTS / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


plots = _load_script("plots")


def _graph(n=9, features=4, seed=0):
  # A star around node 0 (in-degree 6) plus a path 6-7-8 and a self-loop.
  pairs = [(0, i) for i in range(1, 7)] + [(6, 7), (7, 8)]
  senders = [s for s, r in pairs] + [r for s, r in pairs] + [3]
  receivers = [r for s, r in pairs] + [s for s, r in pairs] + [3]
  nodes = np.random.default_rng(seed).normal(size=(n, features))
  return _graphs_tuple(nodes, senders, receivers)


def _graphs_tuple(nodes, senders, receivers) -> jraph.GraphsTuple:
  """One graph of float32 `nodes` [n, f] and int32 edges."""
  return jraph.GraphsTuple(
    nodes=jnp.asarray(nodes, jnp.float32),
    edges=None,
    senders=jnp.asarray(senders, jnp.int32),
    receivers=jnp.asarray(receivers, jnp.int32),
    n_node=jnp.asarray([len(nodes)], jnp.int32),
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


def test_error_structure_shares():
  rng = np.random.default_rng(0)
  groups = rng.integers(0, 3, size=400)
  # Rank 2 and zero-mean: two directions hold everything, no shift.
  low_rank = rng.normal(size=(400, 2)) @ rng.normal(size=(2, 16))
  low_rank -= low_rank.mean(0)
  shares = plots.error_structure(low_rank, groups)
  assert shares["rank_1"] < 0.9 and shares["rank_2"] == pytest.approx(1.0)
  assert shares["shift"] == pytest.approx(0.0, abs=1e-12)
  # A vector per group, plus a little noise: the per-group shift holds
  # nearly all, one shared vector less.
  offsets = rng.normal(size=(3, 16))
  noise = 0.05 * rng.normal(size=(400, 16))
  shifted = plots.error_structure(offsets[groups] + noise, groups)
  assert shifted["degree_shift"] > 0.99 > shifted["shift"]
  # The shares as numpy's least squares gives them.
  error = rng.normal(size=(400, 16)) + 0.3
  shares = plots.error_structure(error, groups, ranks=(1, 4, 16, 32))
  total = np.sum(error**2)
  assert shares["shift"] == pytest.approx(
    1 - np.sum((error - error.mean(0)) ** 2) / total
  )
  u, s, vt = np.linalg.svd(error, full_matrices=False)
  best_4 = (u[:, :4] * s[:4]) @ vt[:4]
  assert shares["rank_4"] == pytest.approx(
    1 - np.sum((error - best_4) ** 2) / total
  )
  assert shares["rank_16"] == pytest.approx(1.0) and np.isnan(shares["rank_32"])
  # A LoRAP-form correction, rows in the span of any 4 vectors (P_B),
  # fitted by least squares, cancels no more than the rank-4 share.
  basis = rng.normal(size=(4, 16))
  coefficients = np.linalg.lstsq(basis.T, error.T, rcond=None)[0].T
  fitted = 1 - np.sum((error - coefficients @ basis) ** 2) / total
  assert fitted <= shares["rank_4"] + 1e-12
  # The shift is a rank-1 correction: rank 1 cancels at least as much.
  assert shares["rank_1"] >= shares["shift"]
  with pytest.raises(ValueError, match="no energy"):
    plots.error_structure(np.zeros((5, 3)), np.zeros(5, int))


def test_predictable_shares_find_an_affine_map_of_the_aggregate():
  rng = np.random.default_rng(2)
  aggregate = rng.normal(size=(600, 8))
  # A rank-2 map of the aggregate: predictable at rank 2, not at rank 1.
  mapped = aggregate @ rng.normal(size=(8, 2)) @ rng.normal(size=(2, 8))
  shares = plots.predictable_shares(
    mapped + 1e-3 * rng.normal(size=mapped.shape), aggregate, ranks=(1, 2, 16)
  )
  assert shares["from_aggregate_rank_2"] > 0.999
  assert shares["from_aggregate_rank_1"] < 0.9
  assert shares["from_aggregate"] > 0.999
  assert np.isnan(shares["from_aggregate_rank_16"])
  # Noise unrelated to the aggregate: nothing out of sample (a little below
  # zero, the price of fitting 9 x 8 coefficients to 300 nodes).
  noise = plots.predictable_shares(rng.normal(size=(600, 8)), aggregate)
  assert -0.1 < noise["from_aggregate"] < 0.0
  # Through `error_structure`, with every measure.
  structure = plots.error_structure(mapped, np.zeros(600, int), aggregate)
  assert structure["from_aggregate_rank_2"] == pytest.approx(1.0)
  assert set(plots.STRUCTURE_MEASURES) == set(structure)


def test_shuffled_null_keeps_columns_and_loses_structure():
  rng = np.random.default_rng(1)
  groups = rng.integers(0, 4, size=500)
  # Rank 1 across nodes plus a shift (rank 2 in all), and a little noise.
  error = np.outer(rng.normal(size=500), rng.normal(size=12)) + 0.5
  error += 0.1 * rng.normal(size=error.shape)
  shares = plots.error_structure(error, groups)
  null = plots.shuffled_structure(error, groups, seed=3)
  # Per-column permutations keep every column's mean, so the shift.
  assert null["shift"] == pytest.approx(shares["shift"])
  assert shares["rank_2"] > 0.98 and null["rank_2"] < 0.6
  assert null == plots.shuffled_structure(error, groups, seed=3)


def _random_graph(n_nodes=40, features=8, seed=0):
  """An undirected random graph with non-negative features (no self-loops)."""
  rng = np.random.default_rng(seed)
  senders, receivers = rng.integers(0, n_nodes, (2, 3 * n_nodes))
  keep = senders != receivers
  senders, receivers = senders[keep], receivers[keep]
  return _graphs_tuple(
    np.abs(rng.normal(size=(n_nodes, features))),
    np.concatenate([senders, receivers]),
    np.concatenate([receivers, senders]),
  )


def test_prompts_fitted_to_cancel_the_error_leave_the_backbone():
  cancelling = _load_script("error_cancelling")
  graph, bits = _random_graph(), 4.0

  def gcn(kind):
    return lorap_jax.GNN(
      model=lorap_jax.ModelConfig(num_classes=3, hidden=8),
      quant=lorap_jax.QuantConfig(),
      prompt=lorap_jax.PromptConfig(kind=kind, num_prompts=4, rank=2),
    )

  plain, prompted = gcn("none"), gcn("lorap")
  trained = plain.init(jax.random.key(0), graph, bits=bits)
  variables = cancelling.with_prompts(
    prompted, trained, graph, bits, jax.random.key(1)
  )
  assert "prompt" in jax.tree.leaves(
    lorap_jax.parameter_groups(variables["params"])
  )
  # The prompts start as a no-op: the errors are the plain model's.
  before = cancelling.relative_errors(prompted, variables, graph, bits)
  np.testing.assert_allclose(
    before, cancelling.relative_errors(plain, trained, graph, bits), rtol=1e-6
  )
  fitted, losses = cancelling.fit_prompts(
    prompted, variables, graph, bits, steps=100, learning_rate=3e-2
  )
  assert len(losses) == 101 and min(losses) < 0.85 * losses[0]
  after = cancelling.relative_errors(prompted, fitted, graph, bits)
  assert float(after.sum()) < 0.85 * float(before.sum())
  groups = lorap_jax.parameter_groups(fitted["params"])
  for label, old, new in zip(
    jax.tree.leaves(groups),
    jax.tree.leaves(variables["params"]),
    jax.tree.leaves(fitted["params"]),
    strict=True,
  ):
    if label != "prompt":
      np.testing.assert_array_equal(old, new)
  # Accuracy: the share of a mask's nodes whose argmax is the label.
  logits = prompted.apply(fitted, graph, bits=bits, train=False)
  labels = np.arange(40) % 3
  mask = np.arange(40) < 25
  want = np.mean(np.argmax(np.asarray(logits), -1)[mask] == labels[mask])
  got = cancelling.accuracies(
    prompted, fitted, graph, bits, labels, {"m": mask}
  )
  assert got == {"m": pytest.approx(want)}


def test_joint_step_adds_the_error_term_to_the_prompts_only():
  cancelling = _load_script("error_cancelling")
  graph = _random_graph()
  model = lorap_jax.GNN(
    model=lorap_jax.ModelConfig(num_classes=3, hidden=8),
    quant=lorap_jax.QuantConfig(),
    # glorot: prompts that already act, so the error term reaches them.
    prompt=lorap_jax.PromptConfig(
      kind="lorap", num_prompts=4, rank=2, init="glorot"
    ),
  )
  state = lorap_jax.create_train_state(
    model, optax.adam(1e-2), graph, jax.random.key(0), 4.0
  )
  labels = jnp.asarray(np.arange(40) % 3)
  batch = lorap_jax.Batch(graph, labels, jnp.arange(40) < 30)
  rng = jax.random.key(1)
  library, _ = lorap_jax.train_step(state, batch, rng)
  # Weight 0 is the library's step.
  plain, _ = cancelling.joint_step_factory(0.0)(model)(state, batch, rng)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
    (plain.params, plain.quant_stats),
    (library.params, library.quant_stats),
  )
  # With the term the backbone still takes the task's step; the prompts
  # take another.
  joint, metrics = cancelling.joint_step_factory(1.0)(model)(state, batch, rng)
  assert float(metrics["error"]) > 0
  moved = []
  for label, got, want in zip(
    jax.tree.leaves(lorap_jax.parameter_groups(joint.params)),
    jax.tree.leaves(joint.params),
    jax.tree.leaves(library.params),
    strict=True,
  ):
    if label == "prompt":
      moved.append(not np.allclose(got, want, rtol=1e-4, atol=1e-6))
    else:
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert any(moved)


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
  # Without reuse every run asked for trains again, and the file keeps the
  # rows of the runs not asked for.
  other = plots.cell_key(protocol, {"quant.bits": 8})
  reread.add(other, 0, best_epoch=1, val_acc=0.1, test_acc=0.2, diverged=-1)
  reread.save()
  fresh = plots.RunCache(tmp_path / "runs.csv", reuse=False)
  assert fresh.missing(key, range(2)) == [0, 1]
  fresh.add(key, 1, best_epoch=4, val_acc=0.7, test_acc=0.8, diverged=-1)
  fresh.save()
  kept = plots.RunCache(tmp_path / "runs.csv")
  assert kept.missing(key, range(2)) == [] and kept.missing(other, [0]) == []
  np.testing.assert_array_equal(kept.test_accuracies(key, [0, 1]), [0.6, 0.8])
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
  structure = [
    {
      "prompt": p,
      "seed": s,
      "layer": layer,
      "source": source,
      "relative_energy": 0.5,
      **{
        m: 0.1 * (i + 1) + 0.01 * s
        for i, m in enumerate(plots.STRUCTURE_MEASURES)
      },
    }
    for p in ("none", "lorap")
    for s in range(2)
    for layer in range(2)
    for source in ("error", "shuffled")
  ]
  structure[0]["rank_8"] = "nan"  # as read back from the CSV
  plots.plot_error_structure(structure, tmp_path / "e.png", 2)
  summary = plots.error_structure_summary(structure)
  assert len(summary) == 8 and summary[0]["seeds"] == 2
  assert summary[0]["shift_mean"] == pytest.approx(0.105)
  # A NaN share (rank above d) is left out of its mean.
  assert summary[0]["rank_8_mean"] == pytest.approx(0.61)
  for name in "abcde":
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
