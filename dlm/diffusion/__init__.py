"""Diffusion processes and their losses, behind one protocol (see `process.Process`).

Importing this package registers every built-in process in `process.PROCESSES`.
"""

# Registers the built-in processes, MDLM first: PROCESSES lists them in this order.
from dlm.diffusion import masked  # noqa: I001, F401
from dlm.diffusion import block, autoregressive, distill, energy  # noqa: F401
from dlm.diffusion.autoregressive import Autoregressive
from dlm.diffusion.masked import MaskedDiffusion
from dlm.diffusion.process import (
    PROCESSES,
    Batch,
    ModelFn,
    Process,
    example_keys,
    exclude_token,
    make_process,
    process_class,
)
from dlm.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    PolynomialSchedule,
    Schedule,
    make_schedule,
    sample_grid_times,
    sample_times,
    stratified_uniform,
)

__all__ = [
    "PROCESSES",
    "SCHEDULES",
    "Autoregressive",
    "Batch",
    "CosineSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "MaskedDiffusion",
    "ModelFn",
    "PolynomialSchedule",
    "Process",
    "Schedule",
    "example_keys",
    "exclude_token",
    "make_process",
    "make_schedule",
    "process_class",
    "sample_grid_times",
    "sample_times",
    "stratified_uniform",
]
