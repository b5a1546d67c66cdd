r"""Scores a trained run: `python -m experiments.evaluate --workdir=DIR [--split=validation]`.

Prints one JSON line: per-token NLL (or NELBO) in nats and bits, perplexity, and the
standard error, for the latest checkpoint or `--checkpoint_step`.
"""

import json

from absl import app, flags

from dlm.training import checkpoint as checkpoint_lib
from dlm.training import experiment, trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_SPLIT = flags.DEFINE_string("split", None, "Split to score (default: config.eval.split).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None,
                                    "Batches to score (0: all; default: config.eval).")
flags.mark_flags_as_required(["workdir"])


def evaluate(workdir: str, split: str | None = None, checkpoint_step: int | None = None,
             num_batches: int | None = None) -> dict:
    """Returns the likelihood metrics of the run in `workdir` (plus `step` and `split`)."""
    exp = experiment.build(experiment.load_config(workdir))
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=exp.config.keep_checkpoints)
    step = checkpoint_step if checkpoint_step is not None else checkpointer.latest_step()
    if step is None or step not in checkpointer.all_steps():
        raise FileNotFoundError(f"no checkpoint {step} in {checkpointer.directory}; "
                                f"available: {checkpointer.all_steps()}")
    state = checkpointer.restore(step, checkpoint_lib.abstract_like(exp.init_state()))
    checkpointer.close()
    split = split or exp.config.eval.split
    metrics = trainer.evaluate_params(exp, state.eval_params(exp.config.eval.use_ema),
                                      split=split, num_batches=num_batches)
    return {"step": step, "split": split, **metrics}


def main(argv):
    del argv
    print(json.dumps(evaluate(_WORKDIR.value, _SPLIT.value, _STEP.value, _NUM_BATCHES.value),
                     sort_keys=True))


if __name__ == "__main__":
    app.run(main)
