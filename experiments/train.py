r"""Trains a model: `python -m experiments.train --config=configs/mdlm.py:micro --workdir=DIR`.

Any config key can be overridden, e.g. `--config.total_steps=500 --config.data.seq_len=128`.
Re-running with the same workdir resumes from its latest checkpoint.

Several processes (a TPU pod slice, a multi-node GPU job) run the same command; see
`dlm.parallel.distributed` for --coordinator_address, --num_processes and --process_id.
On SIGTERM, or after --time_budget, every process finishes the current step, the
checkpoint is saved and the command exits with status 75 (EXIT_RESUMABLE): run it again
to resume. A finished run exits with 0.
"""

import json
import sys

from absl import flags, logging
from ml_collections import config_flags

from dlm.parallel import distributed
from dlm.training import preemption, trainer
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_TIME_BUDGET = flags.DEFINE_string(
    "time_budget", None,
    "Stop (checkpoint saved, exit status 75) after this long: seconds, or e.g. '4h', "
    "'1h30m'. Counted from the start of training; leave room for one step and the save.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def main(argv):
    del argv
    time_budget = preemption.parse_duration(_TIME_BUDGET.value)
    distributed.initialize_from_flags()
    try:
        metrics = trainer.train(_CONFIG.value, _WORKDIR.value, time_budget=time_budget)
    except trainer.Preempted as stopped:
        logging.warning("%s", stopped)
        sys.exit(distributed.EXIT_RESUMABLE)
    if distributed.is_main_process():
        print(json.dumps({k: v for k, v in metrics.items()}, sort_keys=True))


if __name__ == "__main__":
    cli.run(main, "experiments.train")
