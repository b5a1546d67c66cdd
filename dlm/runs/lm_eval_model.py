"""The lm-evaluation-harness model `dlm` over `dlm.runs.harness.Scorer` (imports
`lm_eval`: the `[harness]` extra); the command line is `experiments.lm_eval_harness`."""

from __future__ import annotations

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from dlm import runs
from dlm.runs import harness
from dlm.runs.drawing import check_compatible, make_sampler

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
