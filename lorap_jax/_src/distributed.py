"""Spreading work over every device JAX sees, with `jax.sharding`.

Two kinds of parallelism, each written once for any number of devices (one
device runs the same code):

- Sweeps: configurations lie along the mesh axis ``"config"``. Each device
  trains its share with `jax.shard_map`; configurations never talk to each
  other, so there is no communication until the results come back.
- Data-parallel graph classification: a padded batch's node, edge and graph
  axes are split evenly over the mesh axis ``"data"`` and the parameters
  are replicated. The step is the single-device `train_step`: XLA's SPMD
  partitioner inserts the collectives, so the loss, the gradients (summed
  over devices), BatchNorm statistics and quantizer ranges are those of the
  whole batch, and a run matches its single-device run up to float
  rounding.

Multi-host: call `initialize_multi_host` (or ``lorap ... --coordinator``)
in every process before anything touches a device; `jax.devices()` then
lists every host's devices and the same program runs on all of them.
Arrays are built with `jax.make_array_from_callback` from the host data
every process holds, so each process supplies only its own shards.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CONFIG_AXIS = "config"
DATA_AXIS = "data"


def resolve_devices(count: int | Sequence[jax.Device] | None = None):
  """The devices to use: all (None or 0), the first `count`, or a list.

  Raises:
    ValueError: If `count` is negative or more than JAX sees.
  """
  available = jax.devices()
  if isinstance(count, bool):
    raise ValueError(f"devices={count!r} must be 0 (all) or a count >= 1")
  if count is None or count == 0:
    return list(available)
  if isinstance(count, int):
    if count < 0:
      raise ValueError(f"devices={count!r} must be 0 (all) or a count >= 1")
    if count > len(available):
      raise ValueError(
        f"devices={count} but JAX sees {len(available)} device(s) "
        f"({available[0].platform}); on a CPU, XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count} makes more"
      )
    return list(available[:count])
  devices = list(count)
  if not devices:
    raise ValueError("devices is an empty list")
  return devices


def device_mesh(axis: str, devices=None) -> Mesh:
  """A one-axis mesh over `devices` (see `resolve_devices`)."""
  return Mesh(np.asarray(resolve_devices(devices)), (axis,))


def round_up_to(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def split_leading(mesh: Mesh) -> NamedSharding:
  """Leading axis split evenly over the mesh's one axis."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def put(tree, sharding: NamedSharding):
  """Host data (numpy or jax) as global arrays laid out by `sharding`.

  Every process passes the same host values; each builds only the shards
  of its own devices, which is what multi-host runs need.

  Raises:
    ValueError: If a leaf's leading axis does not divide over the mesh.
  """

  def place(leaf):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(
      host.shape, sharding, lambda index: host[index]
    )

  spec = sharding.spec
  if spec:
    parts = sharding.mesh.shape[spec[0]]
    for leaf in jax.tree.leaves(tree):
      if np.ndim(leaf) == 0 or np.shape(leaf)[0] % parts:
        raise ValueError(
          f"an array of shape {np.shape(leaf)} cannot be split over "
          f"{parts} devices: its leading axis must be a multiple of {parts}"
        )
  return jax.tree.map(place, tree)


def put_replicated(tree, mesh: Mesh):
  """`tree` on every device of `mesh` (device arrays are fetched first)."""
  return put(jax.device_get(tree), replicated(mesh))


def initialize_multi_host(
  coordinator_address: str, num_processes: int, process_id: int
) -> None:
  """Joins this process to a multi-host run (`jax.distributed`).

  Run the same command on every host, each with its own `process_id`
  (0 .. num_processes - 1) and the address (host:port) of process 0.

  Raises:
    ValueError: On a bad process count or id, or an address without port.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be >= 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(
      f"process_id={process_id} must be in 0..{num_processes - 1}"
    )
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(
      f"coordinator address {coordinator_address!r} must be host:port"
    )
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
  )


def is_writer() -> bool:
  """Whether this process writes results (process 0 of a multi-host run)."""
  return jax.process_index() == 0
