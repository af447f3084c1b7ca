"""Multi-device runs against the same runs on one device.

These need 8 devices: `tests/test_multidevice.py` runs this file in a
fresh process with 8 virtual CPU devices
(``--xla_force_host_platform_device_count=8``); collected in the main
process (one device) they skip.
"""

import functools
import json

import jax
import numpy as np
import optax
import pytest

import lorap_jax
from lorap_jax._src import distributed, sweep
from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices; tests/test_multidevice.py runs it with 8 CPUs",
)


def _graph_config(framework: str, devices: int):
  config = lorap_jax.get_config("mutag")
  config.quant.framework = framework
  config.prompt.kind = "lorap"
  config.train.batch_size = 32
  config.model.num_layers, config.model.hidden = 3, 32
  config.devices = devices
  return config


@functools.cache
def _mutag(data_dir):
  return lorap_jax.load_dataset("mutag", data_dir=data_dir)


def _assert_same_update(old, new_a, new_b):
  """Two steps' updates agree to 0.1% of the largest (float rounding)."""
  update_a, update_b = new_a - old, new_b - old
  scale = np.abs(update_b).max()
  np.testing.assert_allclose(update_a, update_b, atol=1e-3 * scale + 1e-9)


def _host_batches(config, data_dir):
  dataset = _mutag(data_dir)
  # Budgets 8 divides, for both runs, so the shapes agree.
  budgets = lorap_jax.make_budgets(dataset.graphs, 32, shards=8)
  return list(
    runs_lib._graph_batches(
      dataset, dataset.folds[0].train, config, budgets, shuffle=False, rng=None
    )
  )


# Degree-Quant's step (percentiles, protective masks) compiles for about a
# minute on 8 virtual devices: run on request with `-m slow`.
@pytest.mark.parametrize(
  "framework", ["fp32", pytest.param("dq", marks=pytest.mark.slow)]
)
def test_data_parallel_step_matches_one_device(framework, data_dir):
  """From the same state, a step on 8 devices is the step on one.

  Compared step by step from one state: over several steps, rounding-sized
  differences (another summation order) move INT4 values across rounding
  boundaries and runs drift apart like any two summation orders would.
  """
  config = _graph_config(framework, 8)
  mesh = runs_lib.data_parallel_mesh(config)
  place = runs_lib._batch_placement(mesh)
  batches = _host_batches(config, data_dir)
  model = state_lib.create_model(config, num_classes=2, task="graph")
  # SGD, so parameter updates are proportional to the gradients (Adam's
  # first step is lr * sign(gradient), whatever the gradient's size).
  state = state_lib.create_train_state(
    model, optax.sgd(0.05), batches[0].graph, jax.random.key(0), 4
  )
  # The first step sets the ranges from one batch; the steps compared
  # below then update initialised ranges, as every later step does.
  state, _ = steps_lib.train_step(state, batches[0], jax.random.key(0))
  for i, batch in enumerate(batches[1:3], start=1):
    sharded_batch = place(batch)
    assert len(sharded_batch.graph.nodes.sharding.device_set) == 8
    rows = {
      s.data.shape[0] for s in sharded_batch.graph.nodes.addressable_shards
    }
    assert rows == {batch.graph.nodes.shape[0] // 8}
    single, single_metrics = steps_lib.train_step(
      state, batch, jax.random.key(i)
    )
    sharded, sharded_metrics = steps_lib.train_step(
      distributed.put_replicated(state, mesh), sharded_batch, jax.random.key(i)
    )
    np.testing.assert_allclose(
      sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5
    )
    jax.tree.map(
      _assert_same_update,
      jax.device_get(state.params),
      jax.device_get(sharded.params),
      jax.device_get(single.params),
    )
    for name in ("quant_stats", "batch_stats"):
      jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
        jax.device_get(getattr(sharded, name)),
        jax.device_get(getattr(single, name)),
      )
    sums = [
      steps_lib.eval_step(
        s, steps_lib.EvalBatch(b.graph, b.labels, {"all": b.mask})
      )
      for s, b in ((sharded, sharded_batch), (single, batch))
    ]
    np.testing.assert_allclose(
      sums[0]["all"]["loss_sum"], sums[1]["all"]["loss_sum"], rtol=1e-4
    )
    assert sums[0]["all"]["correct"] == sums[1]["all"]["correct"]
    state = single


def test_data_parallel_run_trains_like_one_device(tmp_path, data_dir):
  """`train_and_evaluate` on 8 devices: a whole QAT run, checkpointed.

  Whole runs drift apart by rounding (see above; Adam's first steps, about
  lr * sign(gradient), turn rounding-sized gradients into full updates),
  so the comparison with the one-device run is loose.
  """
  runs = []
  for devices in (8, 1):
    config = _graph_config("qat", devices)
    config.data_dir = str(data_dir)
    config.train.epochs, config.folds = 4, 1
    # One batch per epoch: one padding budget, so one step compile per run
    # (each budget compiles for about 15 s on 8 virtual devices).
    config.train.batch_size = 256
    workdir = tmp_path / f"devices_{devices}"
    summary = lorap_jax.train_and_evaluate(config, workdir)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    runs.append((summary, [json.loads(line)["train_loss"] for line in lines]))
  for _, losses in runs:  # Both train: four epochs, the loss going down.
    assert len(losses) == 4 and min(losses[1:]) < losses[0]
  (sharded, _), (single, _) = runs
  assert sharded["val_acc_mean"] >= 0.6 and single["val_acc_mean"] >= 0.6
  # MUTAG's 18 test graphs: within three graphs of each other.
  assert abs(sharded["test_acc_mean"] - single["test_acc_mean"]) <= 3 / 18
  state = sharded["states"][0]
  assert all(
    len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(state.params)
  )
  assert any((tmp_path / "devices_8" / "checkpoints").iterdir())


def test_sweep_splits_configurations_over_devices():
  """Eight configurations on eight devices give one device's numbers."""
  config = lorap_jax.get_config("cora")
  config.quant.framework, config.prompt.kind = "qat", "lorap"
  config.train.epochs = 5
  grid = {"seed": [0, 1, 2, 3], "learning_rate": [0.01, 0.02]}
  sharded = sweep.run_sweep(config, grid, devices=8)
  single = sweep.run_sweep(config, grid, devices=1)
  assert len(sharded.rows) == 8
  for a, b in zip(sharded.rows, single.rows, strict=True):
    assert (a["seed"], a["learning_rate"]) == (b["seed"], b["learning_rate"])
    assert a["best_epoch"] == b["best_epoch"]
    assert a["val_acc"] == b["val_acc"] and a["test_acc"] == b["test_acc"]
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-6)


def test_sweep_with_several_configurations_per_device():
  """16 configurations, 2 per device (vmapped there), padded to 16."""
  config = lorap_jax.get_config("cora")
  config.quant.framework, config.prompt.kind = "fp32", "none"
  config.train.epochs = 4
  grid = {"seed": list(range(5)), "learning_rate": [0.01, 0.02, 0.05]}
  sharded = sweep.run_sweep(config, grid, devices=8, chunk_size=16)
  single = sweep.run_sweep(config, grid, devices=1)
  assert len(sharded.rows) == 15
  for a, b in zip(sharded.rows, single.rows, strict=True):
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-4)
    np.testing.assert_allclose(a["test_acc"], b["test_acc"], atol=2e-3)


def test_graph_sweep_splits_runs_over_devices(data_dir):
  """Eight MUTAG runs, one per device, FP32, one step (the whole fold in a
  batch): the step's loss is one device's. The partitioned program orders
  some sums differently, which Adam's first step can enlarge (README,
  *Sweeps*), so the evaluation after it is compared loosely."""
  config = _graph_config("fp32", devices=0)
  config.data_dir = str(data_dir)
  config.train.epochs, config.folds, config.train.batch_size = 1, 1, 256
  grid = {"seed": [0, 1, 2, 3], "learning_rate": [0.01, 0.02]}
  sharded = sweep.run_sweep(config, grid, devices=8)
  single = sweep.run_sweep(config, grid, devices=1)
  assert len(sharded.rows) == 8
  for a, b in zip(sharded.rows, single.rows, strict=True):
    assert (a["seed"], a["learning_rate"], a["fold"]) == (
      b["seed"],
      b["learning_rate"],
      b["fold"],
    )
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-2)


def test_put_refuses_an_axis_that_does_not_divide():
  mesh = distributed.device_mesh(distributed.DATA_AXIS, 8)
  with pytest.raises(ValueError, match="multiple of 8"):
    distributed.put(np.zeros((12, 3)), distributed.split_leading(mesh))
