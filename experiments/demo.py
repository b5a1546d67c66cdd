r"""`make demo`: train the micro MDLM on the bundled Tiny Shakespeare on CPU and score it.

Prints the validation NELBO in bits per character (the char tokenizer: one token is one
character) at the end. Re-running resumes the same workdir.
"""

import json

from absl import app, flags

from configs import mdlm
from dlm.training import trainer

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
    metrics = trainer.train(config, _WORKDIR.value)
    print(json.dumps({
        "train_loss": round(metrics["train/loss"], 4),
        "validation_bits_per_char": round(metrics["eval/bits_per_token"], 4),
        "stderr_bits": round(metrics["eval/bits_stderr"], 4),
        "workdir": _WORKDIR.value,
    }))


if __name__ == "__main__":
    app.run(main)
