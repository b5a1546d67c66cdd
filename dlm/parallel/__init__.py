"""Between the models and the loops that run them: the (data, model) device mesh, sharding
of batches, train states and tensor-parallel params, multi-process set-up, and binding
networks to parameters (`model_fn`, the frozen networks of a process)."""

from dlm.parallel.bind import frozen_fns, frozen_modules, frozen_params, model_fn
from dlm.parallel.mesh import (
    DATA_AXIS,
    MODEL_AXIS,
    global_batch,
    make_mesh,
    replicated,
    state_sharding,
    tensor_parallel_sharding,
)

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "frozen_fns",
    "frozen_modules",
    "frozen_params",
    "global_batch",
    "make_mesh",
    "model_fn",
    "replicated",
    "state_sharding",
    "tensor_parallel_sharding",
]
