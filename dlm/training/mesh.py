"""The device mesh and moving process-local batches onto it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dlm.training.step import DATA_AXIS


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of all processes) along the `data` axis."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
    """This process's rows -> global arrays sharded along `data`, plus `example_id`."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    batch = {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
             for key, value in local_batch.items()}
    size = batch["tokens"].shape[0]
    ids = np.arange(size, dtype=np.int32)
    rows = local_batch["tokens"].shape[0]
    local_ids = ids[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    batch["example_id"] = jax.make_array_from_process_local_data(sharding, local_ids)
    return batch


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

