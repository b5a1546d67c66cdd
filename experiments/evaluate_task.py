r"""Answers the held-out prompts of a run fine-tuned on prompt/response data and checks them.

    python -m experiments.evaluate_task --workdir=RUN --sampler=NAME [--task=NAME] \
        [--split=test] [--num_examples=N] [--batch_size=16] [--max_new_tokens=N] \
        [--length=L] [--steps=S] [--chat] [--model_parallel=N] \
        [--sampler_config.KEY=VALUE ...] [--out=FILE.jsonl]

Rows of different prompt lengths share each batch (see `dlm.evaluation.answers`). Prints one
JSON line: `task`, `split`, `sampler`, `num_examples`, `accuracy`, `accuracy_stderr`,
`mean_nfe`, `tokens_per_call` (answer tokens, EOS included, per network call),
`positions_per_call` (decoded positions per call, fill included), `tokens_per_second`,
`seconds`, `compile_seconds`. With `--out`, one JSON line per example (`prompt`, `target`,
`response`, `extracted`, `correct`, `nfe`, ...). `--task` names the verifier (default: the
run's data: its generated task, gsm8k, or exact match of a JSONL folder's `answer`).
`--workdir` may be a pretrained Hugging Face folder: `--task` then names a generated task
whose examples it answers, `--chat` puts each prompt in the model's chat template.
"""

from __future__ import annotations

import json

from absl import app, flags

from dlm import runs, sampling
from dlm.data import tasks
from dlm.parallel import distributed
from experiments import cli, run_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A run trained on prompt/response data, or a "
                                "pretrained Hugging Face folder (with --task).")
_SAMPLER = flags.DEFINE_string("sampler", "mdlm", f"One of {', '.join(sampling.SAMPLERS)}.")
_TASK = flags.DEFINE_string("task", None, f"The verifier, one of {', '.join(tasks.TASKS)} "
                            "(default: the run's data's).")
_SPLIT = flags.DEFINE_string("split", "test", "The split whose prompts are answered.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "The first N examples (default: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Prompts answered together.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None,
                                       "The answer budget (default: up to --length).")
_LENGTH = flags.DEFINE_integer("length", None, "Positions per row (default: data.seq_len).")
_STEPS = flags.DEFINE_integer("steps", None, "The sampler's `steps` option.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUT = flags.DEFINE_string("out", None, "Where to write the per-example rows (JSON lines).")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "Checkpoint to load (default: latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", None,
                             "Use the EMA weights (default: the run's eval.use_ema).")
_DRAFTER = flags.DEFINE_string("drafter_workdir", None,
                               "The masked diffusion run drafting for the AR --workdir "
                               "(--sampler=diffuspec).")
flags.mark_flags_as_required(["workdir"])
distributed.define_flags()


def main(parsed):
    argv, overrides = parsed
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    summary = runs.evaluate_task(
        _WORKDIR.value, _SAMPLER.value, _OUT.value, task=_TASK.value, split=_SPLIT.value,
        num_examples=_NUM_EXAMPLES.value, batch_size=_BATCH_SIZE.value,
        length=_LENGTH.value, max_new_tokens=_MAX_NEW_TOKENS.value, steps=_STEPS.value,
        overrides=overrides, seed=_SEED.value, checkpoint_step=_CHECKPOINT_STEP.value,
        use_ema=_USE_EMA.value, chat=run_flags.CHAT.value,
        model_parallel=run_flags.MODEL_PARALLEL.value, drafter_workdir=_DRAFTER.value)
    if distributed.is_main_process():
        print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main, "experiments.evaluate_task", flags_parser=cli.parse_flags)
