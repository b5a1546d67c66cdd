"""The device mesh and moving process-local batches onto it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"  # the mesh axis that batches (and FSDP shards) are split along
MODEL_AXIS = "model"  # the mesh axis of tensor parallelism (heads, MLP width, vocabulary)


def make_mesh(devices=None, *, model: int = 1) -> jax.sharding.Mesh:
    """A (data, model) mesh over all devices (of all processes): `model` devices per tensor
    parallel group (1: every device along `data`, as training uses it).

    The devices of each process are contiguous and in process order, so process p holds
    rows [p * B / P, (p + 1) * B / P) of a global batch, as the data pipeline reads them.
    """
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: d.process_index)  # stable sort
    if not isinstance(model, int) or model < 1 or len(devices) % model:
        raise ValueError(f"model_parallel={model!r} must be a positive int dividing the "
                         f"{len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // model, model)
    return jax.sharding.Mesh(grid, (DATA_AXIS, MODEL_AXIS),
                             axis_types=(AxisType.Auto, AxisType.Auto))


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



# Tensor parallelism (Megatron's split): projections into heads or the MLP width are split
# along their outputs, the projections back along their inputs, the embedding and the head
# along the vocabulary. {the Flax name of a Dense or Embed: the split axis of its kernel}.
_SPLIT_OUT, _SPLIT_IN = 1, 0
_TENSOR_PARALLEL = {"q": _SPLIT_OUT, "k": _SPLIT_OUT, "v": _SPLIT_OUT, "gate": _SPLIT_OUT,
                    "up": _SPLIT_OUT, "fc1": _SPLIT_OUT, "head": _SPLIT_OUT,
                    "out": _SPLIT_IN, "down": _SPLIT_IN, "fc2": _SPLIT_IN}


def tensor_parallel_sharding(abstract_params, mesh: jax.sharding.Mesh):
    """Shardings of a network's params over `mesh`'s `model` axis (replicated along
    `data`): the split of `_TENSOR_PARALLEL` where the axis divides by the model size, the
    embedding along its vocabulary rows, everything else (norms, adaLN, the DiT's final
    layer) replicated. Under jit, XLA inserts the collectives; the logits are the same."""
    size = mesh.shape[MODEL_AXIS]

    def leaf(path, x):
        keys = [getattr(k, "key", None) for k in path]
        shape = tuple(x.shape)
        axis = None
        if keys[-1] == "embedding":
            axis = 0
        elif len(keys) >= 2 and keys[-2] in _TENSOR_PARALLEL and "final" not in keys:
            axis = _TENSOR_PARALLEL[keys[-2]] if keys[-1] == "kernel" else (
                0 if keys[-1] == "bias" and _TENSOR_PARALLEL[keys[-2]] == _SPLIT_OUT else None)
        if size == 1 or axis is None or shape[axis] % size:
            return replicated(mesh)
        spec = [None] * len(shape)
        spec[axis] = MODEL_AXIS
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(leaf, abstract_params)
