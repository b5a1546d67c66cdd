"""The EDLM suite of `experiments.benchmark` (its flags are defined here).

  edlm    generative perplexity (under a judge AR run trained apart from the energy's),
          entropy and wall time against the number of sampling steps for MDLM, EDLM-AR and
          EDLM-NCE on one MDLM denoiser; and EDLM-NCE's NLL estimate next to the MDLM's
          NELBO on the same validation batches and noise.

The runs are given (train them first, see BENCHMARKS.md for the commands): an MDLM run, an
AR run as EDLM-AR's energy, an EDLM-NCE run fine-tuned from that MDLM, and a judge AR run.
"""

from __future__ import annotations

import time

from absl import flags

from dlm import runs, sampling
from dlm.training import trainer
from experiments import report

_MDLM = flags.DEFINE_string("edlm_mdlm_workdir", "/tmp/mdlm_3k", "The MDLM denoiser run.")
_AR_ENERGY = flags.DEFINE_string("edlm_ar_workdir", "/tmp/ladder/ar",
                                 "The AR run used as EDLM-AR's energy.")
_NCE = flags.DEFINE_string("edlm_nce_workdir", "/tmp/edlm_nce",
                           "The EDLM-NCE run (configs/edlm.py, init_from the MDLM run).")
_JUDGE = flags.DEFINE_string("edlm_judge_workdir", "/tmp/ar_2k",
                             "The AR run that scores generative perplexity (not the energy).")
_STEPS = flags.DEFINE_list("edlm_steps", ["16", "32", "64", "128", "256"],
                           "Sampling steps of every row.")
_NUM_SAMPLES = flags.DEFINE_integer("edlm_num_samples", 32, "Samples per row.")
_BATCH = flags.DEFINE_integer("edlm_batch_size", 16, "Samples drawn together.")
_CANDIDATES = flags.DEFINE_integer("edlm_candidates", 4, "EDLM's k.")
_WINDOW_LOW = flags.DEFINE_float("edlm_window_low", 0.0,
                                 "Importance sampling at steps with t >= this.")
_EVAL_BATCHES = flags.DEFINE_integer("edlm_eval_batches", 8,
                                     "Validation batches for the NLL comparison.")


def _row(label: str, steps: int, summary: dict, seconds: float) -> dict:
    return {"label": label, "steps": steps, "nfe": summary["mean_nfe"],
            "tokens_per_second": summary["tokens_per_second"], "gen_ppl": summary["gen_ppl"],
            "entropy": summary["entropy"], "seconds": seconds}


def _claims(rows: list[dict]) -> list[str]:
    """What the table says about the paper's two claims, computed from it."""
    by = {(r["label"], r["steps"]): r for r in rows}
    steps = sorted({r["steps"] for r in rows})
    lines = []
    for label in ("edlm-ar", "edlm-nce"):
        wins = [s for s in steps if by[(label, s)]["gen_ppl"] < by[("mdlm", s)]["gen_ppl"]]
        lines.append(f"- {label} has a lower generative perplexity than mdlm at "
                     f"{len(wins)} of {len(steps)} step counts"
                     f"{' (' + ', '.join(map(str, wins)) + ')' if wins else ''}.")
        best_mdlm = by[("mdlm", steps[-1])]
        reach = [s for s in steps if by[(label, s)]["gen_ppl"] <= best_mdlm["gen_ppl"]]
        if reach:
            first = by[(label, reach[0])]
            lines.append(
                f"  It reaches mdlm@{steps[-1]}'s perplexity ({best_mdlm['gen_ppl']:.2f}) at "
                f"{reach[0]} steps ({first['gen_ppl']:.2f}): {steps[-1] / reach[0]:.1f}x fewer "
                f"steps, {best_mdlm['seconds'] / first['seconds']:.2f}x the wall-time speed.")
        else:
            lines.append(f"  It does not reach mdlm@{steps[-1]}'s perplexity "
                         f"({best_mdlm['gen_ppl']:.2f}) at any step count here.")
    return lines


def edlm_section(command: str) -> str:
    start_all = time.perf_counter()
    mdlm_run = runs.load_run(_MDLM.value)
    judge = runs.load_run(_JUDGE.value)
    ar_energy = runs.load_run(_AR_ENERGY.value)
    nce = runs.load_run(_NCE.value)
    methods = [("mdlm", mdlm_run, {}),
               ("edlm-ar", runs.with_energy(mdlm_run, ar_energy),
                {"num_candidates": _CANDIDATES.value, "window_low": _WINDOW_LOW.value}),
               ("edlm-nce", runs.with_energy(mdlm_run, nce),
                {"num_candidates": _CANDIDATES.value, "window_low": _WINDOW_LOW.value})]
    length = int(mdlm_run.config.data.seq_len)
    rows = []
    for steps in map(int, _STEPS.value):
        for label, run, options in methods:
            name = "mdlm" if label == "mdlm" else "edlm"
            sampler = sampling.get_sampler(name, steps=steps, **options)
            _, summary = runs.sample(run, sampler, num_samples=_NUM_SAMPLES.value,
                                      length=length, batch_size=_BATCH.value, judge=judge)
            seconds = length * _NUM_SAMPLES.value / summary["tokens_per_second"]
            rows.append(_row(label, steps, summary, seconds))
            print(rows[-1], flush=True)
    table = [f"| {r['label']} | {r['steps']} | {r['nfe']:.1f} | {r['gen_ppl']:.2f} | "
             f"{r['entropy']:.3f} | {r['seconds']:.2f} | {r['tokens_per_second']:.0f} |"
             for r in rows]
    nce_nll = trainer.evaluate_workdir(_NCE.value, num_batches=_EVAL_BATCHES.value)
    mdlm_nll = trainer.evaluate_workdir(_MDLM.value, num_batches=_EVAL_BATCHES.value)
    key, err = "eval/nll_nats_per_token", "eval/nll_stderr"
    return "\n".join([
        "## EDLM: energy-based diffusion against MDLM",
        "",
        report.provenance(command),
        "",
        f"One MDLM denoiser (`{_MDLM.value}`, step {mdlm_run.step}); EDLM-AR's energy is the "
        f"AR run `{_AR_ENERGY.value}` (step {ar_energy.step}); EDLM-NCE's energy is "
        f"`{_NCE.value}` (step {nce.step}, fine-tuned by NCE from the MDLM run); generative "
        f"perplexity is judged by `{_JUDGE.value}` (step {judge.step}), an AR run trained "
        f"apart from the energy's. All micro size, Tiny Shakespeare characters, {length} "
        f"tokens per sample, {_NUM_SAMPLES.value} unconditional samples per row at batch "
        f"{_BATCH.value}, seed 0. mdlm: MDLM's ancestral sampler with S steps (+1 argmax "
        f"call). edlm: the same steps, with k = {_CANDIDATES.value} full-sequence candidates "
        f"importance-resampled under exp(-E) at every step with t >= {_WINDOW_LOW.value}; its "
        "NFE counts one energy call per such step. Seconds: sampling wall time for all "
        "samples (compilation excluded).",
        "",
        "| method | steps | NFE | gen ppl | entropy (nats) | seconds | tokens/s |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
        *_claims(rows),
        "",
        f"NLL on {_EVAL_BATCHES.value} validation batches (fixed eval seed, same noise "
        "draws): MDLM NELBO "
        f"{mdlm_nll[key]:.4f} ± {mdlm_nll[err]:.4f} nats/char; EDLM-NCE estimate "
        f"{nce_nll[key]:.4f} ± {nce_nll[err]:.4f} (the paper's estimator: MDLM's bound with "
        "the masked positions' factorised term replaced by the joint one, log Z from one "
        "denoiser draw; an estimate, biased low by Jensen, not a bound).",
        "",
        f"Suite wall time: {time.perf_counter() - start_all:.0f} s.",
    ])
