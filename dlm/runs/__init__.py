"""Trained runs: the workdir layout, checkpoints, loading weights (no optimizer, no data)
and drawing scored samples. The command line, the notebooks and the benchmarks use these."""

from dlm.runs.answering import answer_run, evaluate_task
from dlm.runs.drawing import make_sampler, print_samples, sample, sample_to_file
from dlm.runs.loading import Run, load_run, load_weights, with_drafter, with_energy
from dlm.runs.workdir import (
    CONFIG_FILE,
    ROUNDS_DIR,
    TOKENIZER_DIR,
    RunFiles,
    load_config,
    read_run,
    save_run_files,
)

__all__ = [
    "answer_run",
    "evaluate_task",
    "CONFIG_FILE",
    "ROUNDS_DIR",
    "TOKENIZER_DIR",
    "Run",
    "RunFiles",
    "load_config",
    "load_run",
    "load_weights",
    "make_sampler",
    "print_samples",
    "read_run",
    "sample",
    "sample_to_file",
    "save_run_files",
    "with_drafter",
    "with_energy",
]
