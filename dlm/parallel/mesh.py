"""The device mesh and moving process-local batches onto it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"  # the mesh axis that batches (and FSDP shards) are split along


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of all processes) along the `data` axis.

    The devices of each process are contiguous and in process order, so process p holds
    rows [p * B / P, (p + 1) * B / P) of a global batch, as the data pipeline reads them.
    """
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: d.process_index)  # stable sort
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


def state_sharding(abstract_state, mesh: jax.sharding.Mesh, *, fsdp: bool,
                   min_fsdp_size: int = 2**14):
    """Shardings for a train state: all replicated, or FSDP.

    With `fsdp`, every leaf of at least `min_fsdp_size` elements is split along `data` on
    its largest axis that the number of devices divides (params, EMA and Adam moments
    alike); smaller leaves and leaves with no such axis stay replicated. The gradient
    computation sees gathered parameters; the optimizer update runs on the shards.
    """
    devices = mesh.shape[DATA_AXIS]

    def leaf(x):
        shape = tuple(x.shape)
        if fsdp and devices > 1 and np.prod(shape, dtype=np.int64) >= min_fsdp_size:
            for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
                if shape[axis] % devices == 0:
                    spec = [None] * len(shape)
                    spec[axis] = DATA_AXIS
                    return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree.map(leaf, abstract_state)

