"""Diffusion processes and their losses, behind one protocol (see `process.Process`)."""

from dlm.diffusion.autoregressive import Autoregressive
from dlm.diffusion.masked import MaskedDiffusion
from dlm.diffusion.process import (
    Batch,
    ModelFn,
    Process,
    example_keys,
    exclude_token,
    make_process,
)
from dlm.diffusion.schedules import (
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
    "sample_grid_times",
    "sample_times",
    "stratified_uniform",
]
