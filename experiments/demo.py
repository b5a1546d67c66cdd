r"""`make demo`: train the micro MDLM on the bundled Tiny Shakespeare on CPU, score it, sample.

Prints the validation NELBO in bits per character (the char tokenizer: one token is one
character) and a few samples of the MDLM ancestral sampler. Re-running resumes the same
workdir (and, once trained, only scores and samples).
"""

import json

from absl import flags

from configs import mdlm
from dlm import runs
from dlm.training import trainer
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dlm_demo", "Where the demo run lives.")
_STEPS = flags.DEFINE_integer("steps", 500, "Training steps.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Characters per training sequence.")


def main(argv):
    del argv
    config = mdlm.get_config("micro")
    config.total_steps = _STEPS.value
    config.data.seq_len = _SEQ_LEN.value
    config.eval_every = _STEPS.value
    config.checkpoint_every = _STEPS.value
    trainer.train(config, _WORKDIR.value)
    scores = trainer.evaluate_workdir(_WORKDIR.value, num_batches=0)  # the whole validation split
    print(json.dumps({
        "step": scores["step"],
        "validation_bits_per_char": round(scores["eval/bits_per_token"], 4),
        "stderr_bits": round(scores["eval/bits_stderr"], 4),
        "workdir": _WORKDIR.value,
    }))
    runs.print_samples(_WORKDIR.value, "mdlm", num_samples=3, steps=128)


if __name__ == "__main__":
    cli.run(main, "experiments.demo")
