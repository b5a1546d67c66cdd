r"""lm-evaluation-harness on a dlm run: the model adapter `dlm` and a command line.

    python -m experiments.lm_eval_harness --workdir=RUN --tasks=gsm8k [--include_path=DIR] \
        [--sampler=fast_dllm --sampler_config.threshold=0.9] [--nll_draws=8] [--limit=N] \
        [--out=results.json]

The optional extra `pip install -e '.[harness]'` (lm_eval 0.4.x). The run must be trained on
prompt/response data (SFT); `dlm.evaluation.harness` says how each request type is answered
(`generate_until` through the named sampler, `loglikelihood` through the process's NLL: the
NELBO's Monte-Carlo estimate for diffusion, exact for AR). With lm_eval's own CLI, import
this module first (e.g. `python -c "import experiments.lm_eval_harness, lm_eval.__main__"`)
and pass `--model dlm --model_args workdir=RUN,sampler=fast_dllm,threshold=0.9`.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from dlm import runs
from dlm.evaluation import harness
from dlm.parallel import distributed
from dlm.runs.drawing import check_compatible, make_sampler
from experiments import cli

_SCORER_OPTIONS = ("batch_size", "nll_draws", "length", "seed")


@register_model("dlm")
class DlmLM(LM):
    """An lm_eval model over `harness.Scorer`: `workdir`, `sampler`, the scorer's options
    (batch_size, nll_draws, length, seed) and any other keyword as a sampler option."""

    def __init__(self, workdir: str, sampler: str = "fast_dllm", checkpoint_step=None,
                 use_ema=None, **options):
        super().__init__()
        scorer_options = {k: int(options.pop(k)) for k in _SCORER_OPTIONS
                          if options.get(k) is not None}
        made = make_sampler(sampler, overrides=options)
        files = runs.read_run(workdir)
        check_compatible(made, files)
        run = runs.load_run(files, checkpoint_step, use_ema)
        self.scorer = harness.Scorer(run, made, **scorer_options)

    def loglikelihood(self, requests):
        return self.scorer.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests):
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests):
        return self.scorer.generate_until([tuple(r.args) for r in requests])


def evaluate(workdir: str, task_names: list[str], *, include_path: str | None = None,
             sampler: str = "fast_dllm", sampler_options: dict | None = None,
             limit: int | None = None, **scorer_options) -> dict:
    """lm_eval's `simple_evaluate` of the run on `task_names`; returns its `results`."""
    model = DlmLM(workdir, sampler, **scorer_options, **(sampler_options or {}))
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    output = simple_evaluate(model=model, tasks=list(task_names), task_manager=manager,
                             limit=limit)
    return output["results"]


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
    results = evaluate(_WORKDIR.value, _TASKS.value, include_path=_INCLUDE.value,
                       sampler=_SAMPLER.value, sampler_options=overrides, limit=_LIMIT.value,
                       batch_size=_BATCH.value, nll_draws=_DRAWS.value)
    text = json.dumps(results, default=str)
    if _OUT.value and distributed.is_main_process():
        pathlib.Path(_OUT.value).write_text(text)
    print(text)


if __name__ == "__main__":
    cli.run(main, "experiments.lm_eval_harness", flags_parser=cli.parse_flags)
