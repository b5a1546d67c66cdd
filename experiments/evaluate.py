r"""Scores a trained run: `python -m experiments.evaluate --workdir=DIR [--split=validation]`.

Prints one JSON line: per-token NLL (or NELBO) in nats and bits, perplexity, and the
standard error, for the latest checkpoint or `--checkpoint_step`. Runs on several
processes like `experiments.train` (the same flags); process 0 prints.
"""

import json

from absl import flags

from dlm.parallel import distributed
from dlm.training import trainer
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_SPLIT = flags.DEFINE_string("split", None, "Split to score (default: config.eval.split).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None,
                                    "Batches to score (0: all; default: config.eval).")
flags.mark_flags_as_required(["workdir"])
distributed.define_flags()


def main(argv):
    del argv
    distributed.initialize_from_flags()
    metrics = trainer.evaluate_workdir(_WORKDIR.value, _SPLIT.value, _STEP.value,
                                       _NUM_BATCHES.value)
    if distributed.is_main_process():
        print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    cli.run(main, "experiments.evaluate")
