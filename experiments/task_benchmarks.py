"""The `tasks` suite of `experiments.benchmark` (its flags are defined here): the accuracy-vs-
speed frontier of conditional generation.

For each task of `--tasks_names` it trains (SFT, `configs/sft.py`, the data of
`sft.BENCHMARK_DATA`) an MDLM, a BD3-LM (blocks of 4) and an AR model of the same size, steps
and data order, then answers the first `--tasks_num_examples` test prompts with every
sampler setting that takes the model: `ar` greedy (KV cache, stops at EOS); `mdlm` greedy at
L/4, L/2 and L steps; `llada` (low confidence, one token per call); `dream`; `fast_dllm` at
each threshold and the factor rule; `bd3lm` greedy first-hitting, by confidence one token per
call and with its threshold policy at the thresholds >= 0.7 (KV cache, stops at EOS). It writes the
table (accuracy ± s.e., NFE, tokens per call, tokens/s), the checks the issue asks for, and
a PNG of accuracy against tokens/s beside the output file.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

from absl import flags

from experiments import report

_NAMES = flags.DEFINE_list("tasks_names", ["addition", "sudoku", "word_problems"],
                           "Tasks of the `tasks` suite.")
_METHODS = flags.DEFINE_list("tasks_methods", ["mdlm", "bd3lm", "ar"],
                             "Processes trained per task for `tasks`.")
_STEPS = flags.DEFINE_list(
    "tasks_steps", ["2000"],
    "Training steps of every `tasks` run: N, or TASK=N entries (others: the last plain N).")
_SKIP = flags.DEFINE_list("tasks_skip", [],
                          "TASK:METHOD pairs of `tasks` not trained (to fit a time budget).")
_SIZE = flags.DEFINE_string("tasks_size", "micro", "Model size of every `tasks` run.")
_NUM_EXAMPLES = flags.DEFINE_integer("tasks_num_examples", 200, "Test prompts per setting.")
_BATCH = flags.DEFINE_integer("tasks_batch_size", 100, "Prompts answered together.")
_THRESHOLDS = flags.DEFINE_list("tasks_thresholds", ["0.5", "0.7", "0.9", "0.95"],
                                "`fast_dllm` thresholds.")
_FACTOR = flags.DEFINE_float("tasks_factor", 1.0, "`fast_dllm` factor-rule setting (0: none).")
_WORKDIR = flags.DEFINE_string(
    "tasks_workdir", None,
    "Where the `tasks` runs live (ROOT/TASK_METHOD); finished runs are reused, killed ones "
    "resumed. Unset: a temporary directory.")
_PLOT = flags.DEFINE_string("tasks_plot", "tasks_frontier.png",
                            "The PNG, relative to the folder of --out.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK_SIZE = 4


def steps_for(task: str, entries: list[str]) -> int:
    """The training steps of `task` from `--tasks_steps` entries (N or TASK=N)."""
    default, named = None, {}
    for entry in entries:
        name, sep, value = entry.rpartition("=")
        if not value.strip().isdigit():
            raise ValueError(f"--tasks_steps entry {entry!r}: expected N or TASK=N")
        if sep:
            named[name.strip()] = int(value)
        else:
            default = int(value)
    steps = named.get(task, default)
    if steps is None:
        raise ValueError(f"--tasks_steps gives no steps for task {task!r}")
    return steps


def settings_for(method: str, length: int, thresholds: list[float], factor: float
                 ) -> list[tuple[str, str, dict]]:
    """(label, sampler, options) of every sampler setting for a run of `method`."""
    if method == "ar":
        return [("ar greedy", "ar", {"temperature": 0.0, "stop_at_eos": True})]
    if method == "bd3lm":
        block = {"temperature": 0.0, "stop_at_eos": True}
        return [("bd3lm first-hitting", "bd3lm", block),
                ("bd3lm confidence (1 token/call)", "bd3lm", {**block, "policy": "fixed_count"}),
                *[(f"bd3lm threshold {t:g}", "bd3lm", {**block, "policy": "threshold",
                                                        "threshold": t})
                  for t in thresholds if t >= 0.7]]
    settings = [(f"mdlm {s} steps", "mdlm", {"steps": s, "temperature": 0.0})
                for s in sorted({max(length // 4, 1), max(length // 2, 1), length})]
    settings += [("llada (1 token/call)", "llada", {}), ("dream", "dream", {})]
    settings += [(f"fast_dllm {t:g}", "fast_dllm", {"threshold": t}) for t in thresholds]
    if factor:
        settings.append((f"fast_dllm factor {factor:g}", "fast_dllm", {"factor": factor}))
    return settings


def _root() -> pathlib.Path:
    if _WORKDIR.value:
        return pathlib.Path(_WORKDIR.value).expanduser().resolve()
    return pathlib.Path(tempfile.mkdtemp(prefix="dlm_tasks_"))


def _train(task: str, method: str, workdir: pathlib.Path, steps: int) -> None:
    """Trains (or resumes, or finds finished) one SFT run."""
    from configs import sft

    settings = {"total_steps": steps, "eval_every": steps, "checkpoint_every": steps}
    for key, value in sft.BENCHMARK_DATA.get(task, {}).items():
        if isinstance(value, dict):
            settings.update({f"data.{key}.{k}": v for k, v in value.items()})
        else:
            settings[f"data.{key}"] = value
    if method == "bd3lm":
        settings["block_size"] = BLOCK_SIZE
    command = [sys.executable, "-m", "experiments.train",
               f"--config=configs/sft.py:{method},{task},{_SIZE.value}", f"--workdir={workdir}"]
    command += [f"--config.{k}={v}" for k, v in settings.items()]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def trained_run(task: str, root: pathlib.Path, given: list[str],
                method: str = "mdlm") -> pathlib.Path:
    """The workdir of `task`'s SFT run of `method`: the one `given` as TASK=WORKDIR, else
    root/TASK_METHOD trained (or resumed, or found finished) as this suite trains it, for
    the steps of `--tasks_steps`."""
    runs = dict(entry.split("=", 1) for entry in given)
    if task in runs:
        return pathlib.Path(runs[task]).expanduser().resolve()
    workdir = root / f"{task}_{method}"
    _train(task, method, workdir, steps_for(task, _STEPS.value))
    return workdir


def described(workdir: pathlib.Path) -> str:
    """'WORKDIR (N steps)': a run and its latest checkpoint's step."""
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    return f"{workdir} ({max(steps)} steps)"


def measure(root: pathlib.Path) -> list[dict]:
    """Trains every run and answers with every setting; one dict per (task, run, setting)."""
    from configs import sft

    thresholds = [float(t) for t in _THRESHOLDS.value]
    results = []
    for task in _NAMES.value:
        steps = steps_for(task, _STEPS.value)
        for method in _METHODS.value:
            if f"{task}:{method}" in _SKIP.value:
                continue
            workdir = root / f"{task}_{method}"
            _train(task, method, workdir, steps)
            length = sft.SEQ_LEN[task]
            for label, name, options in settings_for(method, length, thresholds,
                                                     _FACTOR.value):
                summary = _answer(workdir, steps, label, name, dict(options))
                results.append({"task": task, "method": method, "setting": label,
                                "steps": steps, **summary})
    return results


def _answer(workdir: pathlib.Path, steps: int, label: str, name: str, options: dict) -> dict:
    """The summary of one setting on one run (see `answer_cached`; under `frontier/`)."""
    return answer_cached(workdir / "frontier", label, name, options, _NUM_EXAMPLES.value,
                         _BATCH.value, trained_steps=steps)


def answer_cached(folder: pathlib.Path, label: str, name: str, options: dict,
                  num_examples: int, batch_size: int, **key) -> dict:
    """The summary of one setting (sampler `name` with `options`) on the run `folder` lies
    in: measured now, or read back from `folder/LABEL.json` when an earlier invocation
    measured the same setting on the same examples (and the same `key` entries, e.g. the
    training steps), so that a killed suite resumes; tokens/s is then that run's."""
    from dlm import runs as runs_lib

    key = {"sampler": name, "options": options, "num_examples": num_examples,
           "batch_size": batch_size, **key}
    cache = folder / f"{_slug(label)}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["summary"]
    folder.mkdir(exist_ok=True)
    options = dict(options)
    summary = runs_lib.evaluate_task(
        str(folder.parent), name, str(cache.with_suffix(".jsonl")), num_examples=num_examples,
        batch_size=batch_size, steps=options.pop("steps", None), overrides=options)
    cache.write_text(json.dumps({"key": key, "summary": summary}))
    return summary


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _by(results, task, predicate):
    return [r for r in results if r["task"] == task and predicate(r)]


def checks(results: list[dict]) -> list[str]:
    """The claims of the issue, each stated as measured (holds or not)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        one = _by(results, task, lambda r: r["setting"].startswith("llada"))
        fast = _by(results, task, lambda r: r["setting"] == "fast_dllm 0.9")
        if one and fast:
            a, b = one[0], fast[0]
            gap = b["accuracy"] - a["accuracy"]
            within = abs(gap) <= max(0.01, a["accuracy_stderr"], b["accuracy_stderr"])
            holds = b["tokens_per_call"] >= 3 and within
            lines.append(
                f"- `{task}`: `fast_dllm` 0.9 commits {b['tokens_per_call']:.2f} answer "
                f"tokens per call at accuracy {b['accuracy']:.3f} vs {a['accuracy']:.3f} for "
                f"one token per call (gap {gap:+.3f}; s.e. {a['accuracy_stderr']:.3f}): the "
                f"'>= 3 tokens/call within 1 point or one s.e.' claim "
                f"{'holds' if holds else 'does not hold'}.")
        best = {}
        for method in ("mdlm", "bd3lm", "ar"):
            rows = _by(results, task, lambda r, m=method: r["method"] == m)
            if rows:
                best[method] = max(rows, key=lambda r: r["accuracy"])
        if "ar" in best and len(best) > 1:
            parts = [f"{m} {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f} ({r['setting']})"
                     for m, r in best.items()]
            ar_best = best["ar"]
            verdict = []
            for m in ("mdlm", "bd3lm"):
                if m in best:
                    d = best[m]["accuracy"] - ar_best["accuracy"]
                    se = (best[m]["accuracy_stderr"] ** 2 + ar_best["accuracy_stderr"] ** 2) ** .5
                    word = "beats" if d > 2 * se else "loses to" if d < -2 * se else "ties"
                    verdict.append(f"{m} {word} AR ({d:+.3f}, 2 s.e. {2 * se:.3f})")
            lines.append(f"- `{task}`, best setting per model at equal size, steps and data: "
                         f"{'; '.join(parts)}. {'; '.join(verdict)}.")
    return lines


def plot(results: list[dict], path: pathlib.Path,
         groups: tuple[str, ...] = ("mdlm", "bd3lm", "ar")) -> None:
    """Accuracy against answer tokens/s, one panel per task, one point per setting, one
    marker per `groups` entry (a result's "method")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(task_names), figsize=(5 * len(task_names), 4),
                             squeeze=False)
    for ax, task in zip(axes[0], task_names):
        for method, marker in zip(groups, "os^Dvx*P"):
            rows = _by(results, task, lambda r, m=method: r["method"] == m)
            if not rows:
                continue
            ax.errorbar([r["tokens_per_second"] for r in rows], [r["accuracy"] for r in rows],
                        yerr=[r["accuracy_stderr"] for r in rows], fmt=marker, label=method,
                        capsize=2)
            for r in rows:
                ax.annotate(r["setting"].replace(method + " ", ""),
                            (r["tokens_per_second"], r["accuracy"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("answer tokens / s")
        ax.set_ylabel("accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tasks_section(command: str) -> str:
    root = _root()
    results = measure(root)
    out = pathlib.Path(flags.FLAGS["out"].value).resolve()
    plot_path = out.parent / _PLOT.value
    plot(results, plot_path)
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    table = []
    for r in results:
        table.append(
            f"| {r['task']} | {r['method']} | {r['setting']} | {r['accuracy']:.3f} ± "
            f"{r['accuracy_stderr']:.3f} | {r['mean_nfe']:.1f} | {r['tokens_per_call']:.2f} | "
            f"{r['tokens_per_second']:,.0f} |")
    steps = {task: steps_for(task, _STEPS.value) for task in _NAMES.value}
    return "\n".join([
        "## Conditional generation: accuracy against speed on verifiable tasks",
        "",
        report.provenance(command),
        "",
        f"Per task, an MDLM, a BD3-LM (blocks of {BLOCK_SIZE}) and an AR model "
        f"(`configs/sft.py:PROCESS,TASK,{_SIZE.value}`: same size, batch 64, same data order) "
        f"trained from scratch by SFT for {', '.join(f'{t} {s}' for t, s in steps.items())} "
        "steps on the data of `configs/sft.BENCHMARK_DATA` (two-digit addition; default "
        "word problems and 4x4 sudoku). Each setting answers the first "
        f"{_NUM_EXAMPLES.value} test prompts (disjoint from train), {_BATCH.value} per batch, "
        "every position after the prompt open (up to the training length); ± is the binomial "
        "standard error. NFE is network calls per answer row, tokens per call counts the "
        "answer (response and its EOS) per call, tokens/s the answer tokens over the "
        "sampling time (compile excluded; other work may share the machine). "
        f"Runs and per-example answers in `{root}`."
        + (f" Not trained (`--tasks_skip`): {', '.join(_SKIP.value)}." if _SKIP.value else ""),
        "",
        f"![accuracy against tokens/s]({plot_path.name})",
        "",
        "| task | model | setting | accuracy | NFE | tokens/call | tokens/s |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
        "What the issue asks the frontier to show, as measured:",
        "",
        *checks(results),
    ])
