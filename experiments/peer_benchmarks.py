"""Suite `peer`: dlm against the PyTorch reference (kuleshov-group/bd3lms) at identical shapes.

The shapes are those of the reference's comparison: DiT hidden 256, 4 blocks, 4 heads, cond
128, vocabulary 66 (Tiny Shakespeare's 65 characters + mask), length 256, dropout 0,
float32. The dlm side is built only through dlm's API (`experiment.build`,
`make_train_step`, `networks.from_flax`, `sampling.draw`) and runs in a fresh process per
round (`python -m experiments.benchmark --one=peer`); the reference side runs
`experiments/peer_reference.py` under its own torch venv when `--peer_python` and
`--peer_bd3lms` are given. Rounds alternate dlm, reference, dlm, reference, ...; each
figure is the median over rounds of each round's median, and the ratio is dlm / reference.

Also measured on the dlm side: the `mdlm` sampler's per-step overhead over a jitted loop of
the same number of bare forward passes (batch 1 and 16), and the MDLM train step at the
`tiny` size (28.6M parameters) with its model FLOPs utilisation against this machine's
measured float32 matmul peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import report

_PYTHON = flags.DEFINE_string(
    "peer_python", None, "Python of a torch venv that runs the reference (unset: dlm only).")
_BD3LMS = flags.DEFINE_string("peer_bd3lms", None, "A checkout of kuleshov-group/bd3lms.")
_ROUNDS = flags.DEFINE_integer("peer_rounds", 2, "Alternating rounds (each side once per round).")
_ITERS = flags.DEFINE_integer("peer_iters", 10, "Timed calls per row (samplers: peer_iters // 3).")

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 66  # 65 characters + mask, as the reference's character tokenizer gives
LENGTH = 256
BATCH = 16
# (row, label, reference has it)
ROWS = (
    ("mdlm_train_b16", "MDLM train step, batch 16 (loss + backward + AdamW; dlm with its EMA "
     "and clipping)", True),
    ("mdlm_train_b16_plain", "MDLM train step, batch 16, no EMA, no clipping (as the "
     "reference's loop)", False),
    ("bd3lm_train_bs4", "BD3-LM train step, block 4, batch 16 (2L input)", True),
    ("bd3lm_train_bs16", "BD3-LM train step, block 16, batch 16", True),
    ("fwd_b16", "DiT forward, batch 16", True),
    ("fwd_b1", "DiT forward, batch 1", True),
    ("first_hitting", "first-hitting sampler, 256 tokens, batch 1", True),
    ("ddpm_cache", "ddpm_cache, 256 steps, batch 1", True),
    ("bd3lm_bs16_no_cache", "BD3-LM block 16, no KV cache, batch 1", True),
    ("bd3lm_bs16_kv_cache", "BD3-LM block 16 with KV cache (the reference's cached path "
     "needs a GPU)", False),
)


def peer_config(method: str, block_size: int | None = None, plain: bool = False):
    """The run config of `method` ('mdlm' | 'bd3lm') at the reference's shapes."""
    from configs import bd3lm, mdlm

    config = {"mdlm": mdlm, "bd3lm": bd3lm}[method].get_config("micro")
    config.model.update(hidden=256, layers=4, heads=4, kv_heads=4, cond_dim=128, dropout=0.0)
    config.data.seq_len, config.data.batch_size = LENGTH, BATCH
    config.data.data_dir = os.path.join(tempfile.gettempdir(), "dlm_benchmark_tfds")
    if block_size is not None:
        config.block_size = block_size
    if plain:
        config.optimizer.ema_decay, config.optimizer.grad_clip = 0.0, 0.0
    return config


def _build(config, vocab_size: int | None = VOCAB):
    """The experiment of `config` with its model and process at `vocab_size` (None: the
    corpus tokenizer's)."""
    from dlm.diffusion import process as process_lib
    from dlm.models import build_model
    from dlm.training import experiment

    exp = experiment.build(config)
    if vocab_size is None:
        return exp
    return dataclasses.replace(exp, model=build_model(exp.config.model, vocab_size),
                               process=process_lib.make_process(exp.config, vocab_size=vocab_size))


def median_ms(fn, warmup: int, iters: int, *args) -> float:
    """Median wall milliseconds of `fn(*args)` (blocked until ready) after `warmup` calls."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_train_step(config, iters: int, vocab_size: int | None = VOCAB) -> dict:
    """Median ms of the compiled train step on pre-fetched batches, its XLA FLOPs and the
    parameter count."""
    from dlm.data import pipeline
    from dlm.models import param_count
    from dlm.parallel import mesh as mesh_lib
    from dlm.training.step import make_train_step

    exp = _build(config, vocab_size)
    cfg = exp.config
    state = exp.init_state()
    step = make_train_step(exp.model, exp.process, exp.tx, exp.mesh,
                           ema_decay=cfg.optimizer.ema_decay, grad_accum_steps=1,
                           global_batch=cfg.data.batch_size,
                           state_sharding=exp.state_sharding(), frozen=exp.frozen)
    data = pipeline.train_iterator(cfg.data, exp.corpus, seed=0)
    batches = [mesh_lib.global_batch(next(data), exp.mesh) for _ in range(iters + 3)]
    compiled = step.lower(state, batches[0]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    feed = iter(batches)
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], next(feed))
        return metrics

    return {"ms": median_ms(one, 3, iters), "flops": float(cost.get("flops", float("nan"))),
            "params": param_count(state.params)}


def bare_forward_loop(apply_fn, calls: int):
    """A jitted loop of `calls` bare forward passes; each feeds its argmax to the next, so
    none can be hoisted out of the loop."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def loop(params, tokens_BL, t_B):
        def body(_, tokens_BL):
            return jnp.argmax(apply_fn(params, tokens_BL, t_B), -1).astype(tokens_BL.dtype)

        return lax.fori_loop(0, calls, body, tokens_BL)

    return jax.jit(loop)


def measure_dlm(iters: int) -> dict:
    """Every dlm row of the table (median ms) and the overhead and tiny-size figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlm import sampling
    from dlm.models import registry
    from dlm.sampling import networks

    out = {"jax": jax.__version__}
    mdlm = time_train_step(peer_config("mdlm"), iters)
    out.update(mdlm_train_b16=mdlm["ms"], params=mdlm["params"])
    out["mdlm_train_b16_plain"] = time_train_step(peer_config("mdlm", plain=True), iters)["ms"]
    for block in (4, 16):
        out[f"bd3lm_train_bs{block}"] = time_train_step(peer_config("bd3lm", block), iters)["ms"]

    exp = _build(peer_config("mdlm"))
    params = registry.init_params(exp.model, LENGTH, jax.random.PRNGKey(0))
    forward = jax.jit(lambda p, x, t: exp.model.apply({"params": p}, x, t, train=False))
    for batch in (1, 16):
        tokens = np.full((batch, LENGTH), VOCAB - 1, np.int32)
        tokens[:, 0] = 0
        tokens, t = jnp.asarray(tokens), jnp.zeros((batch,), jnp.float32)
        compiled = forward.lower(params, tokens, t).compile()
        out[f"fwd_b{batch}"] = median_ms(compiled, 3, iters, params, tokens, t)

    # Samplers at 256 tokens, batch 1, token 0 ('\n', the reference's BOS) as the prompt.
    sampler_iters = max(iters // 3, 1)

    def time_sampler(row, sampler, network, prm, batch=1):
        drawn = sampling.draw(sampler, network, prm, jax.random.PRNGKey(0), batch_size=batch,
                              length=LENGTH, prompt=[0], num_batches=sampler_iters + 1)
        out[row] = 1e3 * statistics.median(drawn.seconds[1:])
        out[f"{row}_nfe"] = int(np.max(drawn.output.nfe_B))

    net = networks.from_flax(exp.model, exp.process, None, context_len=LENGTH)
    time_sampler("first_hitting", sampling.get_sampler("first_hitting"), net, params)
    time_sampler("ddpm_cache", sampling.get_sampler("ddpm_cache", steps=LENGTH), net, params)
    exp_b = _build(peer_config("bd3lm", 16))
    params_b = registry.init_params(exp_b.model, LENGTH, jax.random.PRNGKey(0))
    net_b = networks.from_flax(exp_b.model, exp_b.process, None, context_len=LENGTH)
    for row, kv in (("bd3lm_bs16_no_cache", False), ("bd3lm_bs16_kv_cache", True)):
        time_sampler(row, sampling.get_sampler("bd3lm", block_size=16, kv_cache=kv), net_b,
                     params_b)

    # The engine's per-step overhead: `mdlm` with 64 steps against as many bare forward
    # passes, timed alternately (one sampler batch, one bare loop) so that the machine's
    # drift falls on both alike.
    mdlm64 = sampling.get_sampler("mdlm", steps=64)
    for batch, rounds in ((1, 3 * sampler_iters), (16, sampler_iters)):
        def sample(batch=batch):
            return sampling.draw(mdlm64, net, params, jax.random.PRNGKey(0), batch_size=batch,
                                 length=LENGTH, prompt=[0])

        calls = int(np.max(sample().output.nfe_B))  # compiles
        tokens = jnp.full((batch, LENGTH), VOCAB - 1, jnp.int32)
        t = jnp.ones((batch,), jnp.float32)
        bare = bare_forward_loop(net.apply_fn, calls).lower(params, tokens, t).compile()
        jax.block_until_ready(bare(params, tokens, t))
        sampled, bared = [], []
        for _ in range(rounds):
            sampled.append(sample().seconds[0])
            bared.append(median_ms(bare, 0, 1, params, tokens, t) / 1e3)
        out[f"mdlm64_b{batch}"] = 1e3 * statistics.median(sampled)
        out[f"bare{calls}_b{batch}"] = 1e3 * statistics.median(bared)
        out[f"overhead_b{batch}"] = statistics.median([s / b for s, b in zip(sampled, bared)]) - 1
        out[f"overhead_calls_b{batch}"] = calls

    # The tiny size: the MDLM train step at batch 16 x 256 on the corpus vocabulary.
    tiny = peer_config("mdlm")
    from configs import mdlm as mdlm_config

    tiny.model = mdlm_config.get_config("tiny").model
    tiny.model.dropout = 0.0
    r = time_train_step(tiny, max(iters // 2, 3), vocab_size=None)
    out.update(tiny_train_ms=r["ms"], tiny_flops=r["flops"], tiny_params=r["params"])
    out["matmul_peak_flops"] = report.matmul_peak_flops()
    return out


def _dlm_round() -> dict:
    command = [sys.executable, "-m", "experiments.benchmark", "--one=peer",
               f"--peer_iters={_ITERS.value}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reference_round(tokenizer_dir: str) -> dict:
    env = dict(os.environ, BD3LMS=str(pathlib.Path(_BD3LMS.value).resolve()),
               PEER_TOK=tokenizer_dir, PEER_ITERS=str(_ITERS.value),
               PEER_SAMPLER_ITERS=str(max(_ITERS.value // 3, 1)), HF_HUB_OFFLINE="1")
    command = [_PYTHON.value, str(ROOT / "experiments" / "peer_reference.py")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                            env=env)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _write_tokenizer(folder: str) -> None:
    """The reference's 65-character tokenizer of the bundled Tiny Shakespeare ('\\n' = BOS =
    id 0), written by the reference's python (it needs transformers)."""
    corpus = ROOT / "dlm" / "data" / "corpora" / "tinyshakespeare.txt"
    command = [_PYTHON.value, str(ROOT / "experiments" / "peer_reference.py"),
               "--write_tokenizer", str(corpus), folder]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _median(rounds: list[dict], key: str):
    values = [r[key] for r in rounds if key in r]
    return statistics.median(values) if values else None


def table(dlm_rounds: list[dict], ref_rounds: list[dict]) -> list[str]:
    """The rows of the ratio table: per measurement the reference's and dlm's medians over
    rounds and their ratio, each round's ratio (round i of dlm against round i of the
    reference) in brackets; '—' where the reference has no such row."""
    lines = []
    for key, label, in_reference in ROWS:
        ours = _median(dlm_rounds, key)
        theirs = _median(ref_rounds, key) if in_reference else None
        per_round = [f"{d[key] / r[key]:.2f}" for d, r in zip(dlm_rounds, ref_rounds)
                     if in_reference and key in r]
        ratio = f"**{ours / theirs:.2f}** ({', '.join(per_round)})" if theirs else "—"
        nfe = _median(dlm_rounds, f"{key}_nfe")
        calls = f" ({nfe} calls)" if nfe is not None else ""
        lines.append(f"| {label}{calls} | {f'{theirs:.1f}' if theirs else '—'} | "
                     f"{ours:.1f} | {ratio} |")
    return lines


def peer_section(command: str) -> str:
    with_reference = bool(_PYTHON.value and _BD3LMS.value)
    if bool(_PYTHON.value) != bool(_BD3LMS.value):
        raise ValueError("--peer_python and --peer_bd3lms go together (or neither: dlm only)")
    start_all = time.perf_counter()
    dlm_rounds, ref_rounds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if with_reference:
            _write_tokenizer(tmp)
        for _ in range(_ROUNDS.value):
            dlm_rounds.append(_dlm_round())
            if with_reference:
                ref_rounds.append(_reference_round(tmp))
    lines = table(dlm_rounds, ref_rounds)
    d = dlm_rounds[0]
    overheads = []
    for b in (1, 16):
        calls = d[f"overhead_calls_b{b}"]
        overheads.append(
            f"batch {b}: `mdlm` {_median(dlm_rounds, f'mdlm64_b{b}'):.1f} ms against "
            f"{_median(dlm_rounds, f'bare{calls}_b{b}'):.1f} ms for {calls} bare forward "
            f"passes, **{100 * _median(dlm_rounds, f'overhead_b{b}'):+.1f}%**")
    overhead = "; ".join(overheads)
    tiny_ms = _median(dlm_rounds, "tiny_train_ms")
    peak = _median(dlm_rounds, "matmul_peak_flops")
    mfu = d["tiny_flops"] / (tiny_ms / 1e3) / peak
    ref = ref_rounds[0] if ref_rounds else {}
    return "\n".join([
        "## Against the PyTorch reference (bd3lms)",
        "",
        report.provenance(command),
        "",
        f"kuleshov-group/bd3lms, unmodified (torch {ref.get('torch', '—')}, "
        f"{ref.get('threads', '—')} threads, SDPA attention, float32, "
        f"{ref.get('params', '—')} parameters) against dlm (jax {d['jax']}, {d['params']:,} "
        "parameters) at the same shapes: DiT hidden 256, 4 blocks, 4 heads, cond 128, "
        "vocabulary 66, length 256, dropout 0. "
        f"{_ROUNDS.value} alternating rounds, each a fresh process per side; each figure is "
        f"the median over rounds of a round's median of {_ITERS.value} calls after warm-up "
        f"(samplers: {max(_ITERS.value // 3, 1)}); the ratio is dlm / reference, with each "
        "round's in brackets." + ("" if with_reference else
                                   " No reference was given (`--peer_python`, "
                                   "`--peer_bd3lms`): dlm's side only."),
        "",
        "| measurement | reference ms | dlm ms | dlm / reference |",
        "|---|---|---|---|",
        *lines,
        "",
        f"The engine's per-step overhead over bare forward passes (random-init micro DiT, "
        f"256 tokens; sampler batches and bare loops timed alternately, the overhead the "
        f"median of the pairs' ratios): {overhead}.",
        "",
        f"The `tiny` MDLM ({d['tiny_params'] / 1e6:.1f}M parameters, character vocabulary), "
        f"train step at batch {BATCH} x {LENGTH}: {tiny_ms:.0f} ms, "
        f"{d['tiny_flops'] / 1e9:.0f} GFLOP per step (XLA's cost analysis), "
        f"{BATCH * LENGTH / (tiny_ms / 1e3):,.0f} tokens/s; MFU **{100 * mfu:.1f}%** of the "
        f"measured float32 matmul peak ({peak / 1e9:.0f} GFLOP/s, 2048^3).",
        "",
        f"Suite wall time: {time.perf_counter() - start_all:.0f} s.",
    ])
