"""Device meshes, placement, budgets and flags on one device.

The 8-device behaviour is tested in `tests/multidevice` (run by
`tests/test_multidevice.py` in a process with 8 virtual CPUs).
"""

import jax
import numpy as np
import pytest

import lorap_jax
from lorap_jax._src import cli, distributed


def test_resolve_devices_counts_and_refusals():
  assert distributed.resolve_devices(None) == jax.devices()
  assert distributed.resolve_devices(0) == jax.devices()
  assert distributed.resolve_devices(1) == jax.devices()[:1]
  with pytest.raises(ValueError, match="JAX sees 1 device"):
    distributed.resolve_devices(jax.device_count() + 1)
  with pytest.raises(ValueError, match="count >= 1"):
    distributed.resolve_devices(-2)
  with pytest.raises(ValueError, match="count >= 1"):
    distributed.resolve_devices(True)
  with pytest.raises(ValueError, match="empty"):
    distributed.resolve_devices([])


def test_put_keeps_values_and_lays_out_by_sharding():
  mesh = distributed.device_mesh(distributed.DATA_AXIS, 1)
  tree = {"a": np.arange(6.0).reshape(3, 2), "b": np.arange(3)}
  placed = distributed.put(tree, distributed.split_leading(mesh))
  np.testing.assert_array_equal(placed["a"], tree["a"])
  assert placed["b"].sharding.spec == jax.sharding.PartitionSpec("data")
  with pytest.raises(ValueError, match="leading axis"):
    distributed.put(np.float32(1.0), distributed.split_leading(mesh))


def test_budgets_split_evenly_over_shards(data_dir):
  dataset = lorap_jax.load_dataset("mutag", data_dir=data_dir)
  single = lorap_jax.make_budgets(dataset.graphs, 32)
  for shards in (3, 8, 48):
    budgets = lorap_jax.make_budgets(dataset.graphs, 32, shards=shards)
    assert len(budgets) == len(single)
    for budget, reference in zip(budgets, single, strict=True):
      assert budget.n_node % shards == 0 and budget.n_edge % shards == 0
      assert budget.n_graph % shards == 0
      assert budget.n_graph >= reference.n_graph
      assert budget.n_node >= reference.n_node
  with pytest.raises(ValueError, match="shards must be at least 1"):
    lorap_jax.make_budgets(dataset.graphs, 32, shards=0)


def test_batches_padded_for_shards_give_the_same_predictions(data_dir):
  """Extra padding graphs (for 8 shards) change no real graph's output."""
  config = lorap_jax.get_config("mutag")
  config.model.num_layers, config.model.hidden = 2, 16
  dataset = lorap_jax.load_dataset("mutag", data_dir=data_dir)
  model = lorap_jax.create_model(config, num_classes=2, task="graph")
  outputs = []
  for shards in (1, 8):
    budgets = lorap_jax.make_budgets(dataset.graphs, 16, shards=shards)
    batch = next(
      lorap_jax.iterate_batches(
        dataset, np.arange(16), 16, budgets, shuffle=False
      )
    )
    if not outputs:
      variables = model.init(
        jax.random.key(0), batch.graph, bits=4.0, train=False
      )
    logits = model.apply(variables, batch.graph, bits=4.0, train=False)
    outputs.append(np.asarray(logits)[batch.graph_mask])
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--num-processes", "2"], "needs --coordinator"),
    (["--coordinator", "nohost", "--num-processes", "2"], "host:port"),
    (
      ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
      "0..1",
    ),
    (["--coordinator", "h:1", "--num-processes", "0"], "must be >= 1"),
  ],
)
def test_multi_host_flags_are_checked(flags, message, capsys):
  status = cli.main(["sweep", "--dataset", "cora", "--workdir", "x", *flags])
  assert status == 2
  assert message in capsys.readouterr().err


def test_devices_flag_reaches_the_config():
  args = cli._parser().parse_args(
    ["train", "--dataset", "mutag", "--workdir", "w", "--devices", "1"]
  )
  assert cli.build_config(args).devices == 1
