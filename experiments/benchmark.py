r"""Benchmarks that write `BENCHMARKS.md`: `python -m experiments.benchmark --suites=...`.

Suites:
  throughput  training tokens/s, model FLOPs utilisation against this machine's measured
              float32 matmul peak, and peak resident memory, for MDLM and AR at
              `--sizes` (each run in its own process, so its peak memory is its own);
  bpc         validation bits per character on Tiny Shakespeare, micro MDLM vs micro AR
              after the same number of steps, with the wall time of each.

Each suite replaces its own section of the file and leaves the others alone; every
section records the command, the machine and the date. Figures are medians.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_SUITES = flags.DEFINE_list("suites", ["throughput", "bpc"], "Suites to run.")
_SIZES = flags.DEFINE_list("sizes", ["micro", "tiny"], "Model sizes for `throughput`.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch for `throughput`.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Sequence length for `throughput`.")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per throughput run.")
_BPC_STEPS = flags.DEFINE_integer("bpc_steps", 1000, "Training steps for `bpc`.")
_BPC_SEQ_LEN = flags.DEFINE_integer("bpc_seq_len", 256, "Sequence length for `bpc`.")
_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "File whose sections are rewritten.")
# Internal: one throughput measurement in a fresh process, printed as JSON.
_ONE = flags.DEFINE_string("one", None, "Internal: 'method:size' to measure and print.")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return (f"{cpu}, {os.cpu_count()} cores, {len(devices)} x {kind} ({jax.default_backend()}), "
            f"jax {jax.__version__}, Python {platform.python_version()}")


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Median float32 FLOP/s of an n x n x n matmul: this machine's practical peak."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


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
    from dlm.training import experiment
    from dlm.training import mesh as mesh_lib
    from dlm.training.step import make_train_step

    exp = experiment.build(_throughput_config(method, size))
    config = exp.config
    state = exp.init_state()
    step = make_train_step(exp.model, exp.process, exp.tx, exp.mesh,
                           ema_decay=config.optimizer.ema_decay, grad_accum_steps=1,
                           global_batch=config.data.batch_size,
                           state_sharding=exp.state_sharding())
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
    peak = matmul_peak_flops()
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
        _provenance(command),
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
        _provenance(command),
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


def _provenance(command: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"`{command}` — {machine()} — {date}"


def write_section(path: pathlib.Path, name: str, body: str) -> None:
    """Replaces the section between `<!-- NAME -->` markers (appends it if missing)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv):
    del argv
    if _ONE.value:
        method, size = _ONE.value.split(":")
        print(json.dumps(measure_one(method, size)))
        return
    command = "python -m experiments.benchmark " + " ".join(sys.argv[1:])
    suites = {"throughput": throughput_section, "bpc": bpc_section}
    unknown = set(_SUITES.value) - set(suites)
    if unknown:
        raise app.UsageError(f"unknown --suites {sorted(unknown)}; known: {sorted(suites)}")
    out = ROOT / _OUT.value
    for name in _SUITES.value:
        write_section(out, name, suites[name](command.strip()))
        print(f"wrote the {name} section of {out}")


if __name__ == "__main__":
    app.run(main)
