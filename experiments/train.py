r"""Trains a model: `python -m experiments.train --config=configs/mdlm.py:micro --workdir=DIR`.

Any config key can be overridden, e.g. `--config.total_steps=500 --config.data.seq_len=128`.
Re-running with the same workdir resumes from its latest checkpoint.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from dlm.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    metrics = trainer.train(_CONFIG.value, _WORKDIR.value)
    print(json.dumps({k: v for k, v in metrics.items()}, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
