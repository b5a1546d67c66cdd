"""Task accuracy of a trained run: the library behind experiments.evaluate_task, the demo and
the `tasks` benchmark suite (the maths is `dlm.evaluation.answers`).

The examples are those of the run's own prompt/response dataset (`config.data`, prepared
again from the same settings if needed); the verifier is `--task`, by default the one the
data names (a generated task's own, `gsm8k` for GSM8K, exact match for a JSONL folder). A
pretrained folder has no data of its own: `--task` names a generated task, whose examples
(default options, seed 0) it answers.
"""

from __future__ import annotations

from dlm import models, sampling
from dlm.data import builders, pipeline, tasks
from dlm.evaluation import answers
from dlm.parallel import distributed
from dlm.runs import loading
from dlm.runs.drawing import (
    check_compatible,
    check_length,
    make_sampler,
    with_companions,
    write_json_lines,
)
from dlm.runs.workdir import RunFiles, read_run


def default_task(files: RunFiles) -> str:
    """The verifier of the run's data: `data.task`, `gsm8k`, or `exact_match`."""
    if files.pretrained is not None:
        raise ValueError(f"{files.workdir} is a pretrained folder, which has no task data: "
                         f"name one of the generated tasks with --task "
                         f"({', '.join(tasks.generated_names())})")
    data = files.config.data
    if data.name == "task":
        return str(data.task)
    return "gsm8k" if data.name == "gsm8k" else "exact_match"


def make_verifier(files: RunFiles, name: str | None) -> tasks.Task:
    """The task named `name` (default: `default_task`), with the run's options when it is the
    run's own generated task."""
    name = name or default_task(files)
    data = files.config.data
    options = dict(data.get("task_options", {}) or {}) if data.name == "task" \
        and name == data.task else {}
    return tasks.make_task(name, **options)


# Examples a pretrained folder answers per split when --num_examples is not given.
PRETRAINED_EXAMPLES = 500


def task_examples(files: RunFiles, split: str, num_examples: int | None,
                  verifier: tasks.Task | None = None) -> list:
    """The first `num_examples` (None: all) prompt/response examples of the run's `split`;
    for a pretrained folder, those of the generated task `verifier` (default
    `PRETRAINED_EXAMPLES`)."""
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"--num_examples={num_examples} must be >= 1")
    if files.pretrained is not None:
        if verifier is None or not tasks.is_generated(verifier):
            raise ValueError(f"{files.workdir} is a pretrained folder: --task must name a "
                             f"generated task ({', '.join(tasks.generated_names())}), got "
                             f"{getattr(verifier, 'name', None)!r}")
        return verifier.examples(split, num_examples or PRETRAINED_EXAMPLES, seed=0)
    if not files.process.conditional:
        raise ValueError(f"{files.workdir} was trained by {type(files.process).__name__}, "
                         "which takes no prompts")
    builder = distributed.main_process_first(
        lambda: builders.prepare_builder(files.config.data), "dlm_task_prepared")
    corpus = pipeline.Corpus(builder, files.tokenizer)
    if not corpus.conditional:
        raise ValueError(f"{files.workdir} was trained on data.name="
                         f"{files.config.data.name!r}, which has no prompts to answer; train on "
                         "data.name='task', 'jsonl' or 'gsm8k'")
    examples = pipeline.examples(corpus, split)
    return examples if num_examples is None else examples[:num_examples]


def layout_for(run: loading.Run, length: int | None, max_new_tokens: int | None
               ) -> answers.Layout:
    """The sampler inputs' layout: `length` (default: the training length), the answer
    budget (default: everything after the prompt) and the run's fill."""
    length = length or int(run.config.data.seq_len)
    check_length(run, length)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
    pad_fill = run.config.data.get("fill", "eos") == "pad"
    tokenizer = run.tokenizer
    return answers.Layout(length=length, max_new_tokens=max_new_tokens or length,
                          fill_id=tokenizer.pad_id if pad_fill else tokenizer.eos_id,
                          mask_id=run.network.vocab.mask_id)


def answer_run(run: loading.Run, sampler, verifier: tasks.Task, examples, *,
               batch_size: int = 16, length: int | None = None,
               max_new_tokens: int | None = None, seed: int = 0, chat: bool = False
               ) -> tuple[list[dict], dict]:
    """(rows, summary) of `examples` answered by the loaded `run` with `sampler` (`chat`:
    each prompt in the tokenizer's chat template)."""
    sampling.check_network(sampler, run.network.kind, f"run ({run.workdir})")
    batch_size = min(batch_size, len(examples))
    layout = layout_for(run, length, max_new_tokens)
    rows, summary = answers.answer(
        sampler, run.network, run.params, verifier, examples, run.tokenizer,
        layout=layout, batch_size=batch_size, seed=seed,
        sharding=loading.batch_sharding(run, batch_size), fetch=distributed.fetch, chat=chat)
    # Every query attends over the L slots of the sequence (or of its cache).
    summary["attention_flops_per_token"] = float(models.attention_flops(
        run.config.model, summary["token_forwards_per_token"], layout.length))
    return rows, summary


def evaluate_task(workdir: str, sampler_name: str, out: str | None = None, *,
                  task: str | None = None, split: str = "test", num_examples: int | None = None,
                  batch_size: int = 16, length: int | None = None,
                  max_new_tokens: int | None = None, steps: int | None = None,
                  overrides: dict | None = None, seed: int = 0,
                  checkpoint_step: int | None = None, use_ema: bool | None = None,
                  chat: bool = False, model_parallel: int = 1,
                  drafter_workdir: str | None = None) -> dict:
    """The command line as a function: answers the run's `split`, writes one JSON line per
    example to `out` (if given) and returns the summary (with the task and split).
    `drafter_workdir`: the masked diffusion run drafting for an AR run (DiffuSpec)."""
    sampler = make_sampler(sampler_name, steps, overrides)  # checks needing no weights first
    files = read_run(workdir)
    drafter = read_run(drafter_workdir) if drafter_workdir else None
    check_compatible(sampler, files, drafter=drafter)
    verifier = make_verifier(files, task)
    examples = task_examples(files, split, num_examples, verifier)
    run = with_companions(loading.load_run(files, checkpoint_step, use_ema,
                                           model_parallel=model_parallel), None, drafter)
    rows, summary = answer_run(run, sampler, verifier, examples, batch_size=batch_size,
                               length=length, max_new_tokens=max_new_tokens, seed=seed,
                               chat=chat)
    summary = {"task": verifier.name, "split": split, **summary}
    if out and distributed.is_main_process():
        write_json_lines(out, rows)
    return summary
