r"""`make demo`: teach a small masked diffusion model two-digit addition on CPU, then decode.

Trains the micro MDLM (1.3M parameters) by supervised fine-tuning on `addition` prompts
(`47+38=` -> `85`), then answers held-out test prompts twice: one token per network call
(`llada`: low-confidence remasking, as many steps as answer positions) and in parallel
(`fast_dllm`: every position whose probability exceeds the threshold per call). Prints a few
prompts with their answers, then accuracy, network calls per answer and tokens per call for
each. The console shows one progress line while training; the full logs go to
`WORKDIR/addition/logs/`. Re-running resumes the run (and, once trained, only decodes).

`--unconditional` keeps the earlier demo: the micro MDLM on the bundled Tiny Shakespeare, its
validation bits per character and three samples (run in `WORKDIR/shakespeare`).
"""

from __future__ import annotations

import contextlib
import json
import logging as logging_std
import pathlib

from absl import flags, logging

from configs import mdlm, sft
from dlm import runs
from dlm.training import metrics, trainer
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dlm_demo", "Where the demo run lives.")
_STEPS = flags.DEFINE_integer("steps", None,
                              "Training steps (default: 2000 for the task, 500 unconditional).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 300, "Held-out prompts answered.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.9, "The `fast_dllm` confidence threshold.")
_SHOW = flags.DEFINE_integer("show", 6, "Prompts printed with their answers.")
_UNCONDITIONAL = flags.DEFINE_bool(
    "unconditional", False, "Train on Tiny Shakespeare and sample instead (the earlier demo).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Characters per sequence (--unconditional).")


def task_config(steps: int):
    """The demo's run: configs/sft.py:mdlm,addition with its benchmark data (two digits)."""
    config = sft.get_config("mdlm,addition")
    config.data.update(sft.BENCHMARK_DATA["addition"])
    config.total_steps = config.eval_every = config.checkpoint_every = steps
    config.log_every = 25  # the progress line
    return config


def decoders(threshold: float) -> list[tuple[str, str, dict]]:
    """(label, sampler, options): one token per call, then the threshold rule."""
    return [("one token per call (llada)", "llada", {}),
            (f"parallel (fast_dllm, threshold {threshold:g})", "fast_dllm",
             {"threshold": threshold})]


@contextlib.contextmanager
def quiet_console(workdir: pathlib.Path):
    """absl logs to `workdir/logs/` and library prints to its `stdout.txt`; the console
    keeps the progress line and errors."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.get_absl_handler()
    handler.use_absl_log_file("demo", str(logs))
    logging.set_stderrthreshold("error")
    progress = metrics.ProgressLine()
    logging_std.getLogger("absl").addHandler(progress)
    try:
        with open(logs / "stdout.txt", "a") as captured, contextlib.redirect_stdout(captured):
            yield
    finally:
        logging_std.getLogger("absl").removeHandler(progress)
        if progress.written:
            print()


def run_task_demo(workdir: pathlib.Path, steps: int, num_examples: int, threshold: float,
                  show: int) -> list[dict]:
    """Trains (or resumes) the task run, answers `num_examples` test prompts with each
    decoder, prints the table and returns the summaries."""
    print(f"Supervised fine-tuning of the micro MDLM on two-digit addition ({steps} steps, "
          f"batch 64; logs in {workdir / 'logs'})")
    with quiet_console(workdir):
        trainer.train(task_config(steps), workdir)
    summaries = []
    for label, name, options in decoders(threshold):
        out = workdir / f"answers_{name}.jsonl"
        with quiet_console(workdir):
            summary = runs.evaluate_task(str(workdir), name, str(out), overrides=options,
                                         num_examples=num_examples, batch_size=100)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        summaries.append({"decoder": label, **summary})
        print(f"\n{label}:")
        for row in rows[:show]:
            mark = "right" if row["correct"] else f"wrong (expected {row['target']})"
            print(f"  {row['prompt']:<8} {row['response']!r:<7} {mark}")
    print(f"\n{num_examples} held-out prompts:")
    print(f"  {'decoder':<40} {'accuracy':>15} {'calls/answer':>13} {'tokens/call':>12} "
          f"{'positions/call':>15}")
    for s in summaries:
        accuracy = f"{s['accuracy']:.3f} ± {s['accuracy_stderr']:.3f}"
        print(f"  {s['decoder']:<40} {accuracy:>15} {s['mean_nfe']:>13.2f} "
              f"{s['tokens_per_call']:>12.2f} {s['positions_per_call']:>15.2f}")
    print("  (tokens: the answer and its EOS; positions: every open position after the prompt, "
          "the EOS fill included; ± is the standard error)")
    return summaries


def run_unconditional_demo(workdir: pathlib.Path, steps: int, seq_len: int) -> dict:
    """The micro MDLM on Tiny Shakespeare: bits per character and three samples."""
    config = mdlm.get_config("micro")
    config.total_steps = config.eval_every = config.checkpoint_every = steps
    config.data.seq_len = seq_len
    print(f"The micro MDLM on Tiny Shakespeare ({steps} steps; logs in {workdir / 'logs'})")
    with quiet_console(workdir):
        trainer.train(config, workdir)
        scores = trainer.evaluate_workdir(str(workdir), num_batches=0)  # the whole split
    result = {"step": scores["step"],
              "validation_bits_per_char": round(scores["eval/bits_per_token"], 4),
              "stderr_bits": round(scores["eval/bits_stderr"], 4), "workdir": str(workdir)}
    print(json.dumps(result))
    runs.print_samples(str(workdir), "mdlm", num_samples=3, steps=seq_len)
    return result


def main(argv):
    del argv
    root = pathlib.Path(_WORKDIR.value).expanduser().resolve()
    if _UNCONDITIONAL.value:
        run_unconditional_demo(root / "shakespeare", _STEPS.value or 500, _SEQ_LEN.value)
    else:
        run_task_demo(root / "addition", _STEPS.value or 2000, _NUM_EXAMPLES.value,
                      _THRESHOLD.value, _SHOW.value)


if __name__ == "__main__":
    cli.run(main, "experiments.demo")
