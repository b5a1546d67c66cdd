"""Between the models and the loops that run them: the device mesh and the `data` axis,
sharding of batches and train states, multi-process set-up, and binding networks to
parameters (`model_fn`, the frozen networks of a process)."""

from dlm.parallel.bind import frozen_fns, frozen_modules, frozen_params, model_fn
from dlm.parallel.mesh import DATA_AXIS, global_batch, make_mesh, replicated, state_sharding

__all__ = [
    "DATA_AXIS",
    "frozen_fns",
    "frozen_modules",
    "frozen_params",
    "global_batch",
    "make_mesh",
    "model_fn",
    "replicated",
    "state_sharding",
]
