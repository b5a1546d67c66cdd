r"""lm-evaluation-harness on a dlm run: the model adapter `dlm` and a command line.

    python -m experiments.lm_eval_harness --workdir=RUN --tasks=gsm8k [--include_path=DIR] \
        [--sampler=fast_dllm --sampler_config.threshold=0.9] [--nll_draws=8] [--limit=N] \
        [--out=results.json]

The optional extra `pip install -e '.[harness]'` (lm_eval 0.4.x). The run must be trained on
prompt/response data (SFT); `dlm.runs.harness` says how each request type is answered
(`generate_until` through the named sampler, `loglikelihood` through the process's NLL: the
NELBO's Monte-Carlo estimate for diffusion, exact for AR). With lm_eval's own CLI, import
`dlm.runs.lm_eval_model` first (it registers the model) and pass
`--model dlm --model_args workdir=RUN,sampler=fast_dllm,threshold=0.9`.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from dlm.parallel import distributed
from dlm.runs import lm_eval_model
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run trained on prompt/response data.")
_TASKS = flags.DEFINE_list("tasks", None, "lm_eval task names.")
_INCLUDE = flags.DEFINE_string("include_path", None, "A folder of extra task YAML files.")
_SAMPLER = flags.DEFINE_string("sampler", "fast_dllm", "The sampler of generate_until.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Requests per batch.")
_DRAWS = flags.DEFINE_integer("nll_draws", 8, "Monte-Carlo draws per diffusion likelihood.")
_LIMIT = flags.DEFINE_integer("limit", None, "At most N documents per task.")
_OUT = flags.DEFINE_string("out", None, "Where to write the results (JSON).")
flags.mark_flags_as_required(["workdir", "tasks"])


def main(parsed):
    argv, overrides = parsed
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = lm_eval_model.evaluate(
        _WORKDIR.value, _TASKS.value, include_path=_INCLUDE.value, sampler=_SAMPLER.value,
        sampler_options=overrides, limit=_LIMIT.value, batch_size=_BATCH.value,
        nll_draws=_DRAWS.value)
    text = json.dumps(results, default=str)
    if _OUT.value and distributed.is_main_process():
        pathlib.Path(_OUT.value).write_text(text)
    print(text)


if __name__ == "__main__":
    cli.run(main, "experiments.lm_eval_harness", flags_parser=cli.parse_flags)
