"""The `adaptive` suite of `experiments.benchmark` (its flags are defined here): early exit
(Prophet, SchED), remasking (RCR, backtracking) and dInfer's credit decoding of
`dlm.sampling.adaptive` against the decodes they modify.

On the MDLM SFT task models (trained as the `tasks` suite trains them unless
`--adaptive_task_runs` names them), in semi-autoregressive blocks of
`--adaptive_block_length`, greedy: `llada` one token per step and `fast_dllm` at threshold
0.9, each alone and with the dual cache, then each method at two or three settings on
them. Each row: accuracy ± s.e., network calls per answer, answer tokens per call, answer
tokens/s, tokens re-masked per answer, and SchED's quality-penalised speed QPS = speed-up x
(accuracy / base accuracy)^gamma (gamma = 4) against the same decoding without the method.
The closing lines state, per paper, whether its claim reproduces in miniature.
"""

from __future__ import annotations

import pathlib
import tempfile

from absl import flags

from experiments import report

_TASKS = flags.DEFINE_list("adaptive_tasks", ["addition", "sudoku"],
                           "Tasks whose MDLM SFT runs the suite decodes.")
_TASK_RUNS = flags.DEFINE_list("adaptive_task_runs", [],
                               "TASK=WORKDIR of trained MDLM SFT runs (others: trained).")
_NUM_EXAMPLES = flags.DEFINE_integer("adaptive_num_examples", 200, "Test prompts per row.")
_BATCH = flags.DEFINE_integer("adaptive_batch_size", 100, "Prompts answered together.")
_BLOCK = flags.DEFINE_integer("adaptive_block_length", 8, "Semi-autoregressive block length.")
_PLOT = flags.DEFINE_string("adaptive_plot", "adaptive_frontier.png",
                            "The PNG, relative to the folder of --out.")

GAMMA = 4  # SchED's QPS exponent
BASES = (("llada", "llada", {}), ("fast_dllm 0.9", "fast_dllm", {"threshold": 0.9}))
# (method, label, options) on top of a base decoding.
CONTENT = {"exit_span": "content"}
# (method, label, options) on top of a base decoding. Exits average the margin over the
# positions not predicted to be the end-of-text fill ('content'), and once over all of them
# as the papers do ('all').
METHODS = (
    ("prophet", "prophet 7.5/5/2.5 all", {"early_exit": "prophet"}),
    ("prophet", "prophet 7.5/5/2.5", {"early_exit": "prophet", **CONTENT}),
    ("prophet", "prophet 5/3.25/1.5", {"early_exit": "prophet", "exit_high": 5.0,
                                       "exit_low": 1.5, **CONTENT}),
    ("sched", "sched exp 7.5→2.5 all", {"early_exit": "exp"}),
    ("sched", "sched linear 7.5→2.5", {"early_exit": "linear", **CONTENT}),
    ("sched", "sched exp 7.5→2.5", {"early_exit": "exp", **CONTENT}),
    ("sched", "sched cosine 5→1.5", {"early_exit": "cosine", "exit_high": 5.0,
                                     "exit_low": 1.5, **CONTENT}),
    ("prophet", "prophet 7.5/5/2.5 min", {"early_exit": "prophet", "exit_aggregate": "min",
                                          **CONTENT}),
    ("sched", "sched exp 7.5→2.5 min", {"early_exit": "exp", "exit_aggregate": "min",
                                        **CONTENT}),
    ("rcr", "rcr 1/step", {"remask": "rcr", "remask_per_step": 1}),
    ("rcr", "rcr 4/step", {"remask": "rcr", "remask_per_step": 4}),
    ("backtrack", "backtrack < 0.5", {"remask": "backtrack", "remask_threshold": 0.5}),
    ("credit", "credit 0.7", {"credit_alpha": 0.7}),
)
# Which methods run on top of fast_dllm and with the dual cache (the others: llada alone).
ON_FAST = ("prophet 7.5/5/2.5", "sched exp 7.5→2.5", "prophet 7.5/5/2.5 min", "rcr 1/step",
           "credit 0.7")
WITH_DUAL = ON_FAST


def settings(block: int) -> list[dict]:
    """Every row's setting: {method, base, cache, label, sampler, options}; each base's
    plain row comes before its methods."""
    rows = []
    for cache in ("none", "dual"):
        for base, name, options in BASES:
            common = {**options, "block_length": block, "temperature": 0.0,
                      "stop_at_eos": True, "cache": cache}
            rows.append({"method": "base", "base": base, "cache": cache, "label": base,
                         "sampler": name, "options": common})
            for method, label, extra in METHODS:
                if (base == "fast_dllm 0.9" and label not in ON_FAST) or (
                        cache == "dual" and label not in WITH_DUAL):
                    continue
                rows.append({"method": method, "base": base, "cache": cache,
                             "label": f"{base} + {label}", "sampler": name,
                             "options": {**common, **extra}})
    return rows


def measure(root: pathlib.Path) -> tuple[list[dict], dict[str, str]]:
    """(one result per (task, setting), {task: the run decoded})."""
    from experiments import task_benchmarks

    results, decoded = [], {}
    for task in _TASKS.value:
        workdir = task_benchmarks.trained_run(task, root, _TASK_RUNS.value)
        decoded[task] = task_benchmarks.described(workdir)
        for setting in settings(_BLOCK.value):
            summary = task_benchmarks.answer_cached(
                workdir / "adaptive", f"{setting['label']} {setting['cache']}",
                setting["sampler"], setting["options"], _NUM_EXAMPLES.value, _BATCH.value)
            results.append({"task": task, **{k: v for k, v in setting.items()
                                             if k != "options"}, **summary})
            print({k: results[-1][k] for k in ("task", "label", "cache", "accuracy",
                                                "mean_nfe", "tokens_per_second")}, flush=True)
    return results, decoded


def base_of(results: list[dict], row: dict) -> dict | None:
    """The row's base decoding (same task and cache, no method)."""
    hits = [r for r in results if r["task"] == row["task"] and r["cache"] == row["cache"]
            and r["base"] == row["base"] and r["method"] == "base"]
    return hits[0] if hits else None


def qps(row: dict, base: dict) -> float:
    """SchED's quality-penalised speed: speed-up x (accuracy / base accuracy)^GAMMA."""
    speedup = row["tokens_per_second"] / base["tokens_per_second"]
    retained = row["accuracy"] / base["accuracy"] if base["accuracy"] > 0 else float("nan")
    return speedup * min(retained, 1.0) ** GAMMA


def _within(row: dict, base: dict) -> bool:
    """Accuracy within one point or one standard error of the base's."""
    se = max(row["accuracy_stderr"], base["accuracy_stderr"], 0.01)
    return abs(row["accuracy"] - base["accuracy"]) <= se


def checks(results: list[dict]) -> list[str]:
    """Per paper, its claim against the miniature, stated as measured."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task and r["method"] != "base"]

        def best(method, metric, rows=rows):
            kept = [(r, base_of(results, r)) for r in rows if r["method"] == method]
            kept = [(r, b) for r, b in kept if b is not None and _within(r, b)]
            return max(kept, key=lambda rb: metric(*rb), default=(None, None))

        r, b = best("prophet", lambda r, b: b["mean_nfe"] / r["mean_nfe"])
        if r is None:
            lines.append(f"- `{task}`, Prophet: no setting kept accuracy within 1 point / "
                         "1 s.e. of its base.")
        else:
            ratio = b["mean_nfe"] / r["mean_nfe"]
            verdict = ("reproduces" if ratio >= 3.4 else
                       "holds in direction, smaller" if ratio > 1.05 else "no gain")
            lines.append(
                f"- `{task}`, Prophet (claim: up to 3.4x fewer steps at preserved accuracy): "
                f"best at preserved accuracy `{r['label']}` ({r['cache']} cache), "
                f"{ratio:.2f}x fewer network calls ({b['mean_nfe']:.1f} → {r['mean_nfe']:.1f}), "
                f"accuracy {r['accuracy']:.3f} vs {b['accuracy']:.3f}: {verdict}.")
        sched = [(r, base_of(results, r)) for r in rows if r["method"] == "sched"]
        sched = [(r, b) for r, b in sched if b is not None]
        if sched:
            r, b = max(sched, key=lambda rb: qps(*rb))
            speedup = r["tokens_per_second"] / b["tokens_per_second"]
            retained = r["accuracy"] / b["accuracy"] if b["accuracy"] else float("nan")
            holds = speedup >= 3.8 and retained >= 0.998
            lines.append(
                f"- `{task}`, SchED (claim: 3.8–4.0x at 99.8–100% retained score): best QPS "
                f"`{r['label']}` ({r['cache']} cache): {speedup:.2f}x tokens/s, "
                f"{retained:.1%} of the base accuracy, QPS {qps(r, b):.2f}: "
                f"{'reproduces' if holds else 'does not reproduce'}.")
        remask = [(r, base_of(results, r)) for r in rows
                  if r["method"] in ("rcr", "backtrack", "credit")]
        for r, b in remask:
            if b is None:
                continue
            gap = r["accuracy"] - b["accuracy"]
            lines.append(
                f"- `{task}`, `{r['label']}` ({r['cache']} cache): accuracy {r['accuracy']:.3f} "
                f"vs {b['accuracy']:.3f} ({gap:+.3f}; 2 s.e. "
                f"{2 * max(r['accuracy_stderr'], b['accuracy_stderr']):.3f}), "
                f"{r['mean_remasked']:.2f} tokens re-masked per answer, "
                f"{r['tokens_per_second'] / b['tokens_per_second']:.2f}x tokens/s "
                f"({b['mean_nfe']:.1f} → {r['mean_nfe']:.1f} calls).")
    return lines


def adaptive_section(command: str) -> str:
    from experiments import task_benchmarks

    root = pathlib.Path(flags.FLAGS["tasks_workdir"].value or tempfile.mkdtemp(
        prefix="dlm_adaptive_"))
    results, decoded = measure(root)
    out = pathlib.Path(flags.FLAGS["out"].value).resolve()
    plot_path = out.parent / _PLOT.value
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    task_benchmarks.plot([{**r, "setting": r["label"], "method": r["method"]}
                          for r in results], plot_path,
                         groups=("base", "prophet", "sched", "rcr", "backtrack", "credit"))
    table = []
    for r in results:
        b = base_of(results, r)
        speed = r["tokens_per_second"] / b["tokens_per_second"] if b else float("nan")
        table.append(
            f"| {r['task']} | {r['label']} | {r['cache']} | {r['accuracy']:.3f} ± "
            f"{r['accuracy_stderr']:.3f} | {r['mean_nfe']:.1f} | {r['tokens_per_call']:.2f} | "
            f"{r['tokens_per_second']:,.0f} | {speed:.2f}x | {r['mean_remasked']:.2f} | "
            f"{qps(r, b) if b else float('nan'):.2f} |")
    return "\n".join([
        "## Adaptive decoding: early exit (Prophet, SchED), remasking (RCR, backtracking), "
        "credit (dInfer)",
        "",
        report.provenance(command),
        "",
        "Policies of `dlm.sampling.adaptive` as options of `llada` (one token per step) and "
        "`fast_dllm` (threshold 0.9), greedy, in blocks of "
        f"{_BLOCK.value}, each alone and with the dual cache, on the MDLM SFT runs ("
        + "; ".join(f"{task}: `{where}`" for task, where in decoded.items())
        + f"). The first {_NUM_EXAMPLES.value} test prompts, {_BATCH.value} per batch; ± the "
        "binomial standard error; NFE the network calls per answer; tokens/call the answer "
        "tokens (with EOS) per call; speed-up and QPS (speed-up x min(1, accuracy / base)^4) "
        "against the same decoding and cache without the method; re-masked: tokens taken "
        "back per answer. Exit thresholds are in nats of top-1 minus top-2 logit margin, "
        "averaged over the positions still to decode ('all', as the papers) or over those "
        "not predicted to be the end-of-text fill (the rows without 'all'), their mean or "
        "('min') their minimum; Prophet: high / middle / low by thirds of the decoding, "
        "SchED: from high to low along it, the progress being the share of the answer's "
        "positions decoded.",
        "",
        f"![accuracy against tokens/s]({plot_path.name})",
        "",
        "| task | decoding | cache | accuracy | NFE | tokens/call | tokens/s | speed-up | "
        "re-masked | QPS |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *table,
        "",
        "What the issue asks the table to show, as measured:",
        "",
        *checks(results),
    ])
