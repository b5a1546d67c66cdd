r"""Benchmarks that write `BENCHMARKS.md`: `python -m experiments.benchmark --suites=...`.

Suites:
  throughput  training tokens/s, model FLOPs utilisation against this machine's measured
              float32 matmul peak, and peak resident memory, for MDLM and AR at
              `--sizes` (each run in its own process, so its peak memory is its own);
  bpc         validation bits per character on Tiny Shakespeare, micro MDLM vs micro AR
              after the same number of steps, with the wall time of each;
  sampling    per sampler (micro MDLM and micro AR checkpoints, trained here or reused with
              `--sampling_workdir_*`): network calls, tokens/s at batch 1 and 16, generative
              perplexity under the AR run, entropy and compile time, per generated length;
              the engine's per-step overhead over a bare loop of forward passes;
  ladder, bd3lm_cost  block diffusion: see `experiments.block_benchmarks`.
  edlm                EDLM against MDLM: see `experiments.edlm_benchmarks`.
  sdtt                SDTT students against their MDLM teacher: see
                      `experiments.sdtt_benchmarks`.
  tasks               accuracy against speed of every sampler on SFT runs (MDLM, BD3-LM,
                      AR) of verifiable tasks: see `experiments.task_benchmarks`.
  pretrained_memory   host memory of loading a ~1 GB pretrained folder: see
                      `experiments.pretrained_benchmarks`.
  caches              approximate KV caches (prefix, dual, dKV, FreeCache, dInfer) against
                      the uncached samplers: see `experiments.cache_benchmarks`.
  speculative         FreeDave, Jacobi decoding and DiffuSpec against the decodes whose
                      output they promise: see `experiments.speculative_benchmarks`.
  adaptive            early exit (Prophet, SchED) and remasking (RCR, backtracking) on the
                      SFT task models: see `experiments.adaptive_benchmarks`.
  peer                train steps, forwards and samplers against the PyTorch reference
                      (bd3lms) at its shapes: see `experiments.peer_benchmarks`.

Each suite replaces its own section of the file and leaves the others alone; every
section records the command, the machine and the date. Figures are medians.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments import (
    adaptive_benchmarks,
    block_benchmarks,
    cache_benchmarks,
    edlm_benchmarks,
    peer_benchmarks,
    pretrained_benchmarks,
    report,
    sdtt_benchmarks,
    speculative_benchmarks,
    task_benchmarks,
)

_SUITES = flags.DEFINE_list("suites", ["throughput", "bpc"],
                            "Suites to run: throughput, bpc, sampling, ladder, bd3lm_cost, "
                            "edlm, sdtt, tasks, pretrained_memory, caches, speculative, adaptive, "
                            "peer.")
_SIZES = flags.DEFINE_list("sizes", ["micro", "tiny"], "Model sizes for `throughput`.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch for `throughput`.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Sequence length for `throughput`.")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per throughput run.")
_BPC_STEPS = flags.DEFINE_integer("bpc_steps", 1000, "Training steps for `bpc`.")
_BPC_SEQ_LEN = flags.DEFINE_integer("bpc_seq_len", 256, "Sequence length for `bpc`.")
_SAMPLING_STEPS = flags.DEFINE_integer(
    "sampling_steps", 1000, "Training steps of the micro runs `sampling` trains itself.")
_SAMPLING_WORKDIR_MDLM = flags.DEFINE_string(
    "sampling_workdir_mdlm", None,
    "Micro MDLM run for `sampling`: reused if it has a checkpoint, else trained there "
    "(unset: trained in a temporary directory).")
_SAMPLING_WORKDIR_AR = flags.DEFINE_string(
    "sampling_workdir_ar", None, "Micro AR run for `sampling` (and its judge); as above.")
_SAMPLING_LENGTHS = flags.DEFINE_list("sampling_lengths", ["128", "512"],
                                      "Generated lengths for `sampling`.")
_SAMPLING_BATCHES = flags.DEFINE_list("sampling_batches", ["1", "16"],
                                      "Sampling batch sizes for `sampling`.")
_SAMPLING_NUM_SAMPLES = flags.DEFINE_integer(
    "sampling_num_samples", 16, "Samples per `sampling` row at batch sizes above 1.")
_SAMPLING_NUM_SAMPLES_B1 = flags.DEFINE_integer(
    "sampling_num_samples_b1", 4, "Samples per `sampling` row at batch size 1.")
_SAMPLING_MDLM_STEPS = flags.DEFINE_list("sampling_mdlm_steps", ["64", "128", "256", "512"],
                                         "Step counts of the `mdlm` rows.")
_SAMPLING_THRESHOLDS = flags.DEFINE_list("sampling_thresholds", ["0.7", "0.8", "0.9", "0.95"],
                                         "Confidence thresholds of the `fast_dllm` rows.")
_SAMPLING_LONG_ROWS = flags.DEFINE_list(
    "sampling_long_rows", ["ar", "mdlm@64", "mdlm@128", "fast_dllm@0.9"],
    "Rows (labels as in the table, or 'all') run at lengths above the runs' training length.")
_SAMPLING_OVERHEAD_STEPS = flags.DEFINE_integer(
    "sampling_overhead_steps", 64, "`mdlm` steps timed against bare forward passes.")
_SAMPLING_REPEATS = flags.DEFINE_integer("sampling_repeats", 5,
                                         "Timed runs per overhead measurement (median).")
_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "File whose sections are rewritten.")
# Internal: one throughput measurement in a fresh process, printed as JSON.
_ONE = flags.DEFINE_string("one", None,
                           "Internal: 'method:size' (or 'peer') to measure and print.")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _throughput_config(method: str, size: str):
    from configs import ar, mdlm

    config = {"mdlm": mdlm, "ar": ar}[method].get_config(size)
    config.data.seq_len = _SEQ_LEN.value
    config.data.batch_size = _BATCH.value
    config.data.data_dir = os.path.join(tempfile.gettempdir(), "dlm_benchmark_tfds")
    return config


def measure_one(method: str, size: str) -> dict:
    """Times the jitted train step (after compiling) and counts its FLOPs with XLA."""
    import jax

    from dlm.data import pipeline
    from dlm.models import param_count
    from dlm.parallel import mesh as mesh_lib
    from dlm.training import experiment
    from dlm.training.step import make_train_step

    exp = experiment.build(_throughput_config(method, size))
    config = exp.config
    state = exp.init_state()
    step = make_train_step(exp.model, exp.process, exp.tx, exp.mesh,
                           ema_decay=config.optimizer.ema_decay, grad_accum_steps=1,
                           global_batch=config.data.batch_size,
                           state_sharding=exp.state_sharding(), frozen=exp.frozen)
    data = pipeline.train_iterator(config.data, exp.corpus, seed=0)
    batch = mesh_lib.global_batch(next(data), exp.mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan")))
    num_params = param_count(state.params)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_TIMED_STEPS.value):
        batch = mesh_lib.global_batch(next(data), exp.mesh)
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {
        "method": method, "size": size, "params": num_params,
        "tokens_per_step": config.data.batch_size * config.data.seq_len,
        "step_seconds": seconds, "compile_seconds": compile_seconds, "flops_per_step": flops,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _run_one(method: str, size: str) -> dict:
    command = [sys.executable, "-m", "experiments.benchmark", f"--one={method}:{size}",
               f"--batch={_BATCH.value}", f"--seq_len={_SEQ_LEN.value}",
               f"--timed_steps={_TIMED_STEPS.value}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def throughput_section(command: str) -> str:
    peak = report.matmul_peak_flops()
    rows = []
    for size in _SIZES.value:
        for method in ("mdlm", "ar"):
            r = _run_one(method, size)
            tokens_per_sec = r["tokens_per_step"] / r["step_seconds"]
            mfu = r["flops_per_step"] / r["step_seconds"] / peak
            rows.append(
                f"| {method} | {size} | {r['params'] / 1e6:.2f}M | {r['step_seconds']:.3f} | "
                f"{tokens_per_sec:,.0f} | {r['flops_per_step'] / 1e9:.1f} | {100 * mfu:.1f}% | "
                f"{r['peak_rss_gib']:.2f} | {r['compile_seconds']:.1f} |")
    return "\n".join([
        "## Training throughput",
        "",
        report.provenance(command),
        "",
        f"Batch {_BATCH.value} x {_SEQ_LEN.value} tokens, float32, character vocabulary "
        f"(Tiny Shakespeare); median of {_TIMED_STEPS.value} steps after compiling. FLOPs per "
        "step are XLA's cost analysis of the compiled train step (forward, backward and "
        f"optimizer). Measured float32 matmul peak (2048^3, median of 10): "
        f"**{peak / 1e9:.1f} GFLOP/s**; MFU = FLOPs per step / step time / that peak. Peak RSS "
        "is the whole process's (data pipeline, compiler and runtime included).",
        "",
        "| process | size | params | s/step | tokens/s | GFLOP/step | MFU | peak RSS GiB | "
        "compile s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def _train_and_score(method: str, workdir: pathlib.Path) -> tuple[list[dict], float]:
    steps = _BPC_STEPS.value
    command = [sys.executable, "-m", "experiments.train", f"--config=configs/{method}.py:micro",
               f"--workdir={workdir}", f"--config.total_steps={steps}",
               f"--config.eval_every={max(steps // 4, 1)}", f"--config.log_every={steps}",
               f"--config.checkpoint_every={steps}", "--config.eval.num_batches=0",
               f"--config.data.seq_len={_BPC_SEQ_LEN.value}",
               f"--config.data.data_dir={tempfile.gettempdir()}/dlm_benchmark_tfds"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/bits_per_token" in r], wall


def bpc_section(command: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: _train_and_score(m, pathlib.Path(tmp) / m) for m in ("mdlm", "ar")}
    lines = [
        "## Validation bits per character: micro MDLM vs micro AR (Tiny Shakespeare)",
        "",
        report.provenance(command),
        "",
        f"Both trained with their `configs/*.py:micro` settings for {_BPC_STEPS.value} steps "
        f"(batch 32 x {_BPC_SEQ_LEN.value} characters), scored on the whole validation split "
        "with EMA weights. MDLM reports its continuous-time NELBO (an upper bound), AR its "
        "exact NLL; both per character.",
        "",
        "| step | MDLM bits/char (NELBO) | AR bits/char | MDLM / AR |",
        "|---|---|---|---|",
    ]
    for m_row, a_row in zip(results["mdlm"][0], results["ar"][0]):
        m, a = m_row["eval/bits_per_token"], a_row["eval/bits_per_token"]
        lines.append(f"| {m_row['step']} | {m:.3f} ± {m_row['eval/bits_stderr']:.3f} | "
                     f"{a:.3f} ± {a_row['eval/bits_stderr']:.3f} | {m / a:.3f} |")
    lines += ["", f"Wall time (train + evaluations): MDLM {results['mdlm'][1]:.0f} s, "
              f"AR {results['ar'][1]:.0f} s. Published anchor (text8, not comparable data): "
              "MD4 1.37 vs AR 1.23 bits/char, ratio 1.11."]
    return "\n".join(lines)


# --- sampling -------------------------------------------------------------------------------

def _has_checkpoint(workdir: pathlib.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _sampling_workdir(method: str, flag_value: str | None, tmp: str) -> tuple[pathlib.Path, str]:
    """The run's workdir (trained there unless it already has a checkpoint) and a note."""
    workdir = pathlib.Path(flag_value).expanduser() if flag_value else pathlib.Path(tmp) / method
    if _has_checkpoint(workdir):
        return workdir, f"reused `{workdir}`"
    steps = _SAMPLING_STEPS.value
    command = [sys.executable, "-m", "experiments.train", f"--config=configs/{method}.py:micro",
               f"--workdir={workdir}", f"--config.total_steps={steps}",
               f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
               "--config.data.seq_len=128"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return workdir, f"trained here for {steps} steps in {time.perf_counter() - start:.0f} s"


def _sampling_rows(long: bool) -> list[tuple[str, str, dict]]:
    """(label, sampler name, options) of every row; at lengths past training, the chosen few."""
    mdlm_steps = [int(s) for s in _SAMPLING_MDLM_STEPS.value]
    rows = [(f"mdlm@{s}", "mdlm", {"steps": s}) for s in mdlm_steps]
    rows.append((f"ddpm_cache@{max(mdlm_steps)}", "ddpm_cache", {"steps": max(mdlm_steps)}))
    rows += [("first_hitting", "first_hitting", {}), ("llada", "llada", {}),
             ("dream", "dream", {})]
    rows += [(f"fast_dllm@{t}", "fast_dllm", {"threshold": float(t)})
             for t in _SAMPLING_THRESHOLDS.value]
    rows.append(("ar", "ar", {}))
    chosen = set(_SAMPLING_LONG_ROWS.value)
    if long and "all" not in chosen:
        rows = [row for row in rows if row[0] in chosen]
    return rows


def _median_seconds(fn, *args) -> float:
    import jax

    times = []
    for _ in range(_SAMPLING_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _overhead(run, batch: int, length: int) -> dict:
    """Median seconds of `mdlm` with S steps against the same number of bare forward passes."""
    import jax
    import jax.numpy as jnp

    from dlm import sampling

    sampler = sampling.get_sampler("mdlm", steps=_SAMPLING_OVERHEAD_STEPS.value)
    drawn = sampling.draw(sampler, run.network, run.params, jax.random.PRNGKey(0),
                          batch_size=batch, length=length, num_batches=_SAMPLING_REPEATS.value)
    calls = int(np.max(drawn.output.nfe_B))
    tokens_BL = jnp.full((batch, length), run.network.vocab.mask_id, jnp.int32)
    t_B = jnp.ones((batch,), jnp.float32)
    bare_fn = peer_benchmarks.bare_forward_loop(run.network.apply_fn, calls).lower(
        run.params, tokens_BL, t_B).compile()
    jax.block_until_ready(bare_fn(run.params, tokens_BL, t_B))
    bare = _median_seconds(bare_fn, run.params, tokens_BL, t_B)
    engine_seconds = float(np.median(drawn.seconds))
    return {"batch": batch, "length": length, "calls": calls, "bare": bare,
            "engine": engine_seconds, "overhead": engine_seconds / bare - 1}


def _frontier_paragraph(results: list[dict], mdlm_step: int, ar_step: int,
                        backend: str) -> str:
    """What the measured rows say about diffusion against AR, per length and batch."""
    sentences = [
        f"Checkpoints: micro MDLM after {mdlm_step} steps, micro AR after {ar_step} steps, "
        f"both trained at 128 characters; measured on this machine's "
        f"{'CPU' if backend == 'cpu' else backend.upper()}. 'Comparable quality' below means "
        "a generative perplexity at most 1.5x the AR samples' and a unigram entropy at least "
        "0.9x theirs (the AR judge scores its own samples, which favours AR)."]
    for length in sorted({r["length"] for r in results}):
        for batch in sorted({r["batch"] for r in results}):
            cell = [r for r in results if r["length"] == length and r["batch"] == batch]
            ar = next((r for r in cell if r["label"] == "ar"), None)
            if ar is None:
                continue
            diffusion = [r for r in cell if r["label"] != "ar"]
            faster = [r for r in diffusion if r["tokens_per_second"] > ar["tokens_per_second"]]
            comparable = [r for r in faster
                          if r["gen_ppl"] <= 1.5 * ar["gen_ppl"]
                          and r["entropy"] >= 0.9 * ar["entropy"]]
            head = (f"At {length} tokens, batch {batch}: AR {ar['tokens_per_second']:,.0f} "
                    f"tokens/s, gen ppl {ar['gen_ppl']:.2f}, entropy {ar['entropy']:.2f}. ")
            if not faster:
                best = max(diffusion, key=lambda r: r["tokens_per_second"], default=None)
                tail = ("no diffusion sampler is faster" + (
                    f" (the fastest, {best['label']}, reaches {best['tokens_per_second']:,.0f} "
                    f"tokens/s)" if best else "") + ".")
            else:
                listed = ", ".join(f"{r['label']} ({r['tokens_per_second']:,.0f} tokens/s, "
                                   f"ppl {r['gen_ppl']:.2f}, entropy {r['entropy']:.2f})"
                                   for r in sorted(faster, key=lambda r: -r["tokens_per_second"]))
                tail = f"faster than AR: {listed}; "
                tail += (f"of these, at comparable quality: "
                         f"{', '.join(r['label'] for r in comparable)}." if comparable else
                         "none of them at comparable quality.")
            sentences.append(head + tail[0].upper() + tail[1:])
    return " ".join(sentences)


def sampling_section(command: str) -> str:
    import jax

    from dlm import runs, sampling

    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mdlm_dir, mdlm_note = _sampling_workdir("mdlm", _SAMPLING_WORKDIR_MDLM.value, tmp)
        ar_dir, ar_note = _sampling_workdir("ar", _SAMPLING_WORKDIR_AR.value, tmp)
        mdlm_run, ar_run = runs.load_run(mdlm_dir), runs.load_run(ar_dir)
    train_len = int(mdlm_run.config.data.seq_len)
    results, table = [], []
    for length in (int(x) for x in _SAMPLING_LENGTHS.value):
        for batch in (int(x) for x in _SAMPLING_BATCHES.value):
            num_samples = (_SAMPLING_NUM_SAMPLES_B1.value if batch == 1
                           else _SAMPLING_NUM_SAMPLES.value)
            for label, name, options in _sampling_rows(long=length > train_len):
                sampler = sampling.get_sampler(name, **options)
                run = ar_run if sampler.rule.network_kind == ar_run.network.kind else mdlm_run
                _, summary = runs.sample(run, sampler, num_samples=num_samples, length=length,
                                         batch_size=batch, judge=ar_run)
                results.append({"label": label, "length": length, "batch": batch, **summary})
                table.append(
                    f"| {length} | {batch} | {label} | {summary['mean_nfe']:.1f} | "
                    f"{summary['tokens_per_second']:,.0f} | {summary['gen_ppl']:.2f} | "
                    f"{summary['entropy']:.2f} | {summary['compile_seconds']:.1f} |")
                print(table[-1], flush=True)
    overheads = [_overhead(mdlm_run, batch, train_len)
                 for batch in (int(x) for x in _SAMPLING_BATCHES.value)]
    overhead_rows = [
        f"| {o['batch']} | {o['length']} | {o['calls']} | {o['bare']:.3f} | {o['engine']:.3f} | "
        f"{100 * o['overhead']:+.1f}% |" for o in overheads]
    long_lengths = [x for x in _SAMPLING_LENGTHS.value if int(x) > train_len]
    long_note = (f" Lengths above {train_len} ({', '.join(long_lengths)}) are outside both "
                 "runs' training length: the MDLM denoiser has never seen such sequences, so "
                 "its quality there is out of distribution (the AR model extrapolates through "
                 f"RoPE, also untrained there; the judge scores {train_len}-token windows); "
                 f"only these rows run there: {', '.join(_SAMPLING_LONG_ROWS.value)}."
                 if long_lengths else "")
    return "\n".join([
        "## Sampling: speed and quality per sampler",
        "",
        report.provenance(command),
        "",
        f"Micro MDLM (`{mdlm_dir}`, {mdlm_note}; checkpoint step {mdlm_run.step}) and micro AR "
        f"(`{ar_dir}`, {ar_note}; checkpoint step {ar_run.step}), Tiny Shakespeare "
        f"characters, trained at {train_len} tokens, EMA weights. Unconditional samples "
        f"({_SAMPLING_NUM_SAMPLES.value} per row at batch > 1, "
        f"{_SAMPLING_NUM_SAMPLES_B1.value} at batch 1; AR starts from BOS, so it generates "
        "length - 1 tokens). NFE: network calls per sample (AR: one cached one-token decode "
        "each, far cheaper than a full denoiser call). tokens/s: generated tokens over "
        "sampling wall time, compilation excluded (timed apart). Gen ppl: perplexity of the "
        "samples under the micro AR run (lower is better, but greedy samplers buy it with "
        "repetition); entropy: mean per-sample unigram entropy in nats (low: repetitive). "
        "Samplers at their defaults: mdlm@S is S steps on a uniform "
        "time grid and a last argmax call when masks remain (at most S + 1 calls); "
        "ddpm_cache skips calls when nothing changed; llada (greedy, blocks of 32) and dream "
        "(temperature 0.2) take one step per position; fast_dllm@T is greedy with "
        "confidence threshold T; ar at temperature 1." + long_note,
        "",
        "| length | batch | sampler | NFE | tokens/s | gen ppl | entropy (nats) | compile s |",
        "|---|---|---|---|---|---|---|---|",
        *table,
        "",
        f"Engine overhead: `mdlm` with {_SAMPLING_OVERHEAD_STEPS.value} steps (its NFE calls) "
        "against a jitted `lax.fori_loop` of the same number of bare forward passes of the "
        "same network, params and shapes (each feeding its argmax to the next); median of "
        f"{_SAMPLING_REPEATS.value} runs after compiling. The overhead is everything else a "
        "step does: log-softmax, float64 Gumbel noise, selection, commits, stop checks.",
        "",
        "| batch | length | forward passes | bare loop s | mdlm s | overhead |",
        "|---|---|---|---|---|---|",
        *overhead_rows,
        "",
        _frontier_paragraph(results, mdlm_run.step, ar_run.step, jax.default_backend()),
        "",
        f"Suite wall time (training included): {time.perf_counter() - start_all:.0f} s.",
    ])


def main(argv):
    del argv
    if _ONE.value == "peer":
        print(json.dumps(peer_benchmarks.measure_dlm(flags.FLAGS["peer_iters"].value)))
        return
    if _ONE.value:
        method, size = _ONE.value.split(":")
        print(json.dumps(measure_one(method, size)))
        return
    command = "python -m experiments.benchmark " + " ".join(sys.argv[1:])
    suites = {"throughput": throughput_section, "bpc": bpc_section,
              "sampling": sampling_section,
              "ladder": lambda c: block_benchmarks.ladder_section(c),
              "bd3lm_cost": lambda c: block_benchmarks.cost_section(c),
              "edlm": edlm_benchmarks.edlm_section,
              "sdtt": sdtt_benchmarks.sdtt_section, "tasks": task_benchmarks.tasks_section,
              "pretrained_memory": pretrained_benchmarks.memory_section,
              "caches": cache_benchmarks.caches_section,
              "speculative": speculative_benchmarks.speculative_section,
              "adaptive": adaptive_benchmarks.adaptive_section,
              "peer": peer_benchmarks.peer_section}
    unknown = set(_SUITES.value) - set(suites)
    if unknown:
        raise app.UsageError(f"unknown --suites {sorted(unknown)}; known: {sorted(suites)}")
    out = ROOT / _OUT.value
    for name in _SUITES.value:
        report.write_section(out, name, suites[name](command.strip()))
        print(f"wrote the {name} section of {out}")


if __name__ == "__main__":
    app.run(main)
