"""The `sdtt` suite of `experiments.benchmark` (its flags are defined here).

  sdtt  self-distillation through time on Tiny Shakespeare (micro): distils the MDLM run
        `--sdtt_teacher` with each of `--sdtt_divergences` (`configs/sdtt.py:micro`, the first
        for all its rounds, the others for `--sdtt_comparison_rounds`), then samples the
        teacher at `--sdtt_teacher_steps` and every run's last student at
        `--sdtt_student_steps` with the MDLM ancestral sampler, and reports generative
        perplexity under the AR run `--sdtt_judge`, unigram entropy, network calls and wall
        time, plus each round's student at the steps it targets.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

from absl import flags

from experiments import report

_TEACHER = flags.DEFINE_string("sdtt_teacher", None,
                               "The micro MDLM run to distil (Tiny Shakespeare, seq_len 128).")
_JUDGE = flags.DEFINE_string("sdtt_judge", None,
                             "The micro AR run scoring generative perplexity.")
_WORKDIR = flags.DEFINE_string(
    "sdtt_workdir", None,
    "Where the distillation runs live (ROOT/<divergence>); finished runs are reused, killed "
    "ones resumed. Unset: a temporary directory.")
_DIVERGENCES = flags.DEFINE_list("sdtt_divergences", ["reverse_kl", "mse", "tvd"],
                                 "Divergences distilled with; the first runs every round.")
_COMPARISON_ROUNDS = flags.DEFINE_integer(
    "sdtt_comparison_rounds", 0, "Rounds of the other divergences' runs (0: all).")
_TEACHER_STEPS = flags.DEFINE_list("sdtt_teacher_steps",
                                   ["8", "16", "32", "64", "128", "256", "512", "1024"],
                                   "Sampling steps of the teacher rows.")
_STUDENT_STEPS = flags.DEFINE_list("sdtt_student_steps", ["8", "16", "32", "64"],
                                   "Sampling steps of the student rows.")
_NUM_SAMPLES = flags.DEFINE_integer("sdtt_num_samples", 64, "Samples per row.")
_BATCH = flags.DEFINE_integer("sdtt_batch", 32, "Samples drawn together.")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config():
    from configs import sdtt

    return sdtt.get_config("micro")


def _run_settings(divergence: str, first: bool) -> dict:
    """Command-line overrides of one distillation run."""
    config = _config()
    rounds = config.total_steps // config.process.round_steps
    if not first and _COMPARISON_ROUNDS.value:
        rounds = min(rounds, _COMPARISON_ROUNDS.value)
    return {"init_from": str(pathlib.Path(_TEACHER.value).resolve()),
            "process.divergence": divergence,
            "total_steps": rounds * config.process.round_steps}


def _finished(workdir: pathlib.Path, total_steps: int) -> bool:
    return (workdir / "checkpoints" / str(total_steps)).is_dir()


def _distil(workdir: pathlib.Path, settings: dict) -> None:
    """Trains (or resumes, or finds finished) one distillation run."""
    if _finished(workdir, settings["total_steps"]):
        return
    command = [sys.executable, "-m", "experiments.train", "--config=configs/sdtt.py:micro",
               f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in settings.items()]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _train_seconds(workdir: pathlib.Path) -> float:
    """Wall seconds of the run's training (compilation included), from its logged rates."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "steps_per_sec" in r]
    seconds, previous = 0.0, 0
    for row in logged:
        seconds += (row["step"] - previous) / row["steps_per_sec"]
        previous = row["step"]
    return seconds


def _data_entropy() -> float:
    """Mean unigram entropy (nats) of the validation split's sequences, as the samples'."""
    import numpy as np

    from dlm.data import pipeline
    from dlm.evaluation import generative

    data = _config().data
    corpus = pipeline.load_corpus(data)
    values = [generative.unigram_entropy(row) for batch in
              pipeline.eval_batches(data, corpus, "validation") for row in batch["tokens"]]
    return float(np.mean(values))


def _eval_nelbo(workdir: pathlib.Path, step: int) -> str:
    """The run's validation NELBO at `step` ('—' when it was not evaluated there)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    found = [r for r in rows if r.get("step") == step and "eval/nll_nats_per_token" in r]
    if not found:
        return "—"
    return f"{found[-1]['eval/nll_nats_per_token']:.3f} ± {found[-1]['eval/nll_stderr']:.3f}"


def _last_eval_step(workdir: str) -> int:
    rows = [json.loads(line) for line in
            (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in rows if "eval/nll_nats_per_token" in r)


def _student_dirs(workdir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """(targeted sampling steps, directory) of every kept round, fewest steps first."""
    from dlm.training import trainer

    kept = [(int(p.name.split("_")[0]), p)
            for p in (workdir / trainer.ROUNDS_DIR).iterdir() if p.name.endswith("_steps")]
    return sorted(kept)


def _sample_rows(root: pathlib.Path, label: str, workdir, judge_workdir: str,
                 steps_list: list[int]) -> dict[int, dict]:
    """{steps: summary} of the `mdlm` sampler on the run in `workdir` at each step count.

    Rows are cached in ROOT/samples/<label>.json (with the sample count in the key), so an
    interrupted suite resumes where it stopped.
    """
    from dlm import runs

    cache = root / "samples" / f"{label}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    key = "{}@{}x{}".format  # steps @ samples x batch
    missing = [s for s in steps_list
               if key(s, _NUM_SAMPLES.value, _BATCH.value) not in done]
    if missing:
        run, judge = runs.load_run(workdir), runs.load_run(judge_workdir)
        length = int(run.config.data.seq_len)
        for steps in missing:
            sampler = runs.make_sampler("mdlm", steps, {})
            _, summary = runs.sample(run, sampler, num_samples=_NUM_SAMPLES.value,
                                      length=length, seed=0, batch_size=_BATCH.value,
                                      judge=judge)
            done[key(steps, _NUM_SAMPLES.value, _BATCH.value)] = summary
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(done, indent=1))
    return {s: done[key(s, _NUM_SAMPLES.value, _BATCH.value)] for s in steps_list}


def _cell(summary: dict) -> str:
    return f"{summary['gen_ppl']:.2f} / {summary['entropy']:.2f}"


def sdtt_section(command: str) -> str:
    if not _TEACHER.value or not _JUDGE.value:
        raise ValueError("the sdtt suite needs --sdtt_teacher (a micro MDLM run, seq_len 128) "
                         "and --sdtt_judge (a micro AR run with the same tokenizer)")
    root = (pathlib.Path(_WORKDIR.value).expanduser().resolve() if _WORKDIR.value
            else pathlib.Path(tempfile.mkdtemp(prefix="dlm_sdtt_")))
    divergences = list(_DIVERGENCES.value)
    runs = {}
    for index, divergence in enumerate(divergences):
        settings = _run_settings(divergence, index == 0)
        _distil(root / divergence, settings)
        runs[divergence] = settings
    teacher_steps = [int(s) for s in _TEACHER_STEPS.value]
    student_steps = [int(s) for s in _STUDENT_STEPS.value]
    teacher_rows = _sample_rows(root, "teacher", _TEACHER.value, _JUDGE.value, teacher_steps)
    student_rows, round_rows = {}, []
    for divergence in divergences:
        kept = _student_dirs(root / divergence)
        student_rows[divergence] = _sample_rows(root, f"{divergence}_last", kept[0][1],
                                                _JUDGE.value, student_steps)
        for target, directory in kept:
            if directory == kept[0][1] and target in student_steps:  # sampled just above
                summary = student_rows[divergence][target]
            else:
                summary = _sample_rows(root, f"{divergence}_{target}", directory,
                                       _JUDGE.value, [target])[target]
            step = max(int(c.name) for c in (directory / "checkpoints").iterdir()
                       if c.name.isdigit())
            round_rows.append((divergence, target, summary,
                               _eval_nelbo(root / divergence, step)))
    length = int(_config().data.seq_len)

    all_steps = sorted(set(teacher_steps) | set(student_steps))
    header = "| model | " + " | ".join(str(s) for s in all_steps) + " |"
    rule = "|---|" + "---|" * len(all_steps)

    def line(name, rows):
        return f"| {name} | " + " | ".join(_cell(rows[s]) if s in rows else "—"
                                           for s in all_steps) + " |"

    config = _config()
    p = config.process
    table = [header, rule, line("teacher (MDLM, 2000 steps)", teacher_rows)]
    for divergence in divergences:
        total = runs[divergence]["total_steps"]
        target = _student_dirs(root / divergence)[0][0]
        table.append(line(f"student {divergence}, {total // p.round_steps} rounds "
                          f"(targets {target})", student_rows[divergence]))
    rounds_table = ["| divergence | round's student targets | gen PPL | entropy | NFE | "
                    "NELBO (nats/char) |", "|---|---|---|---|---|---|"]
    rounds_table += [f"| {d} | {t} | {s['gen_ppl']:.2f} | {s['entropy']:.2f} | "
                     f"{s['mean_nfe']:.0f} | {nelbo} |" for d, t, s, nelbo in round_rows]
    seconds = ["| sampling steps | NFE | seconds per batch of "
               f"{_BATCH.value} x {length} |", "|---|---|---|"]
    per_batch = _BATCH.value / _NUM_SAMPLES.value
    seconds += [f"| {s} | {r['mean_nfe']:.0f} | {r['seconds'] * per_batch:.2f} |"
                for s, r in sorted(teacher_rows.items())]
    wall = ", ".join(f"{d} {runs[d]['total_steps']} steps in "
                     f"{_train_seconds(root / d) / 60:.1f} min" for d in divergences)
    return "\n".join([
        "## SDTT: few-step students distilled from the micro MDLM (Tiny Shakespeare)",
        "",
        report.provenance(command),
        "",
        f"Teacher: `{_TEACHER.value}`; judge: `{_JUDGE.value}` (AR). Distillation: "
        f"`configs/sdtt.py:micro` ({p.distill_steps} teacher steps per student step, first "
        f"teacher at {p.teacher_steps} steps, {p.round_steps} train steps per round, dt doubling "
        f"each round, the teacher replaced by the student's EMA; lr "
        f"{config.optimizer.learning_rate}, batch {config.data.batch_size} x "
        f"{config.data.seq_len}). Runs in `{root}`. Sampling: the MDLM ancestral sampler "
        f"(`--sampler=mdlm --steps=S`, MDLM's noise removal at the end), "
        f"{_NUM_SAMPLES.value} samples of {length} characters per "
        "cell, seed 0, EMA weights. Each cell: generative perplexity under the AR judge / "
        f"mean unigram entropy (nats) of a sample (validation sequences: {_data_entropy():.2f}; "
        "lower means more repetitive text, which also lowers the perplexity).",
        "",
        *table,
        "",
        "Each round's student at the number of steps it was distilled for, with its "
        "validation NELBO (8 batches, EMA weights; the teacher's: "
        f"{_eval_nelbo(pathlib.Path(_TEACHER.value), _last_eval_step(_TEACHER.value))}):",
        "",
        *rounds_table,
        "",
        f"Wall time, distillation: {wall} (2 shared CPU cores, other jobs running). "
        "Sampling, teacher (the students cost the same per step):",
        "",
        *seconds,
    ])
