r"""Scores a trained run: `python -m experiments.evaluate --workdir=DIR [--split=validation]`.

Prints one JSON line: per-token NLL (or NELBO) in nats and bits, perplexity, and the
standard error, for the latest checkpoint or `--checkpoint_step`.
"""

import json

from absl import app, flags

from dlm.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_SPLIT = flags.DEFINE_string("split", None, "Split to score (default: config.eval.split).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None,
                                    "Batches to score (0: all; default: config.eval).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    metrics = trainer.evaluate_workdir(_WORKDIR.value, _SPLIT.value, _STEP.value,
                                       _NUM_BATCHES.value)
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
