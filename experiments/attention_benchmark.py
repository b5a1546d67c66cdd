r"""Attention benchmark: the Pallas block-sparse kernel against dense-masked XLA attention and
`jax.nn.dot_product_attention` (cuDNN), forward and forward+backward, bf16.

    python -m experiments.attention_benchmark --out=BENCHMARKS.md

needs a GPU (or a TPU, without the cuDNN column) and replaces the `attention` section of
`--out` (between `<!-- begin attention -->` and `<!-- end attention -->`), recording the
command, the machine and the date. On a CPU the kernels only run in Pallas interpret mode,
whose times say nothing about the kernel, so the benchmark refuses to run there;
`--allow_cpu_smoke` runs tiny shapes end to end to check the script, prints them and writes
nothing.

L is the attention length (queries = keys = L); for the two-stream BD3-LM mask that is
x_t ⊕ x_0, L / 2 tokens per stream. Achieved TFLOP/s count only unmasked work:
4 * B * H * D * (allowed query-key pairs) for the forward, 2.5 times that for the backward
(FlashAttention-2's convention), whatever each implementation actually computes.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dlm.models.attention import attend
from dlm.models.masks import MaskSpec
from experiments import report
from pallas_kernels import BlockSizes, block_sparse_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "attention"

_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file whose section is replaced.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"], "Attention lengths L.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions.")
_MASKS = flags.DEFINE_list("masks", ["full", "causal", "bd3lm:4", "bd3lm:16"],
                           "Mask specs (MaskSpec strings).")
_TOKENS = flags.DEFINE_integer("batch_tokens", 16384, "B * L per call (B = this / L, >= 1).")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "H * D (H = this / D query heads, K = H).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compiling.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls; the median is reported.")
_BLOCK_Q = flags.DEFINE_integer("block_q", None, "Kernel forward query tile (default: kernel's).")
_BLOCK_KV = flags.DEFINE_integer("block_kv", None, "Kernel forward key tile.")
_BLOCK_Q_BWD = flags.DEFINE_integer("block_q_bwd", None, "Kernel backward query tile.")
_BLOCK_KV_BWD = flags.DEFINE_integer("block_kv_bwd", None, "Kernel backward key tile.")
_CPU_SMOKE = flags.DEFINE_bool(
    "allow_cpu_smoke", False,
    "On a CPU, run tiny shapes in interpret mode to check that the script runs; prints, "
    "writes nothing (interpret-mode times are not performance figures).")

IMPLS = ("pallas", "xla", "cudnn")


def _block_sizes(backend: str) -> BlockSizes | None:
    given = [f.value for f in (_BLOCK_Q, _BLOCK_KV, _BLOCK_Q_BWD, _BLOCK_KV_BWD)]
    if all(v is None for v in given):
        return None
    default = BlockSizes.default(backend)
    q, kv, q_bwd, kv_bwd = (v if v is not None else d for v, d in zip(given, (
        default.block_q, default.block_kv, default.block_q_bwd, default.block_kv_bwd)))
    return BlockSizes(q, kv, q_bwd, kv_bwd)


def attention_fn(impl: str, mask: MaskSpec, L: int, backend: str):
    """Returns f(q, k, v) -> out for one implementation, or None if it does not apply."""
    if impl == "pallas":
        sizes = _block_sizes(backend)
        return lambda q, k, v: block_sparse_attention(q, k, v, mask, block_sizes=sizes,
                                                      backend=backend)
    if impl == "xla":
        return lambda q, k, v: attend(q, k, v, mask, impl="xla")
    if jax.default_backend() != "gpu":
        return None
    if mask.kind in ("full", "causal"):
        causal = mask.kind == "causal"
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="cudnn")
    dense = jnp.asarray(mask.dense(L, L))[None, None]  # [1, 1, L, L], a general cuDNN mask
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense,
                                                        implementation="cudnn")


def with_backward(fn):
    """f(q, k, v, cotangent) -> (dq, dk, dv): one forward and one backward pass."""
    def run(q, k, v, cot):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(cot)
    return run


def median_ms(compiled, args) -> float:
    for _ in range(_WARMUP.value):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_ITERS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def measure(impl, mask, L, D, B, H, backend, dtype):
    """Returns (forward ms, forward+backward ms, forward output) or a string reason."""
    fn = attention_fn(impl, mask, L, backend)
    if fn is None:
        return "n/a"
    keys = jax.random.split(jax.random.key(L * 1000 + D), 4)
    q, k, v, cot = (jax.random.normal(key, (B, L, H, D), dtype) for key in keys)
    try:
        fwd = jax.jit(fn).lower(q, k, v).compile()
        fwd_bwd = jax.jit(with_backward(fn)).lower(q, k, v, cot).compile()
        out = fwd(q, k, v)
        return median_ms(fwd, (q, k, v)), median_ms(fwd_bwd, (q, k, v, cot)), out
    except Exception as e:  # an OOM or an unsupported mask becomes a table entry
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"  {impl} {mask} L={L} D={D}: {type(e).__name__}: {first[:200]}", flush=True)
        return "OOM" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e) else "error"


def run_grid(lengths, head_dims, masks, backend, dtype, tokens, hidden):
    """Measures every (mask, L, D); returns a list of row dicts."""
    rows = []
    for mask in masks:
        for L in lengths:
            pairs = int(mask.dense(L, L).sum())  # unmasked query-key pairs
            for D in head_dims:
                B, H = max(1, tokens // L), max(1, hidden // D)
                flops_fwd = 4.0 * B * H * D * pairs
                row = {"mask": str(mask), "L": L, "D": D, "B": B, "H": H,
                       "density": pairs / L**2, "flops_fwd": flops_fwd}
                outs = {}
                for impl in IMPLS:
                    result = measure(impl, mask, L, D, B, H, backend, dtype)
                    if isinstance(result, str):
                        row[impl] = result
                    else:
                        row[impl] = result[:2]
                        outs[impl] = result[2]
                if "pallas" in outs and "xla" in outs:
                    got, want = (np.asarray(outs[i], np.float32) for i in ("pallas", "xla"))
                    row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                rows.append(row)
                print(_row_text(row, 0), flush=True)
    return rows


def _ms(value, index):
    return f"{value[index]:.3f}" if isinstance(value, tuple) else value


def _tflops(row, impl, index):
    value = row[impl]
    if not isinstance(value, tuple):
        return "–"
    flops = row["flops_fwd"] * (1.0 if index == 0 else 3.5)
    return f"{flops / (value[index] * 1e-3) / 1e12:.1f}"


def _speedup(row, other, index):
    """Other implementation's time / the kernel's time."""
    a, b = row["pallas"], row[other]
    if not (isinstance(a, tuple) and isinstance(b, tuple)):
        return "–"
    return f"{b[index] / a[index]:.2f}x"


def _row_text(row, index) -> str:
    """One markdown table row; index 0 = forward, 1 = forward+backward."""
    cells = [row["mask"], str(row["L"]), str(row["D"]), f"{row['B']}x{row['H']}",
             f"{row['density']:.3f}"]
    cells += [_ms(row[i], index) for i in IMPLS]
    cells += [_tflops(row, i, index) for i in IMPLS]
    cells += [_speedup(row, "xla", index), _speedup(row, "cudnn", index)]
    if index == 0:
        cells.append(f"{row['rel_err']:.1e}" if "rel_err" in row else "–")
    return "| " + " | ".join(cells) + " |"


def _header(index) -> str:
    columns = ["mask", "L", "D", "BxH", "density", "pallas ms", "xla ms", "cudnn ms",
               "pallas TFLOP/s", "xla TFLOP/s", "cudnn TFLOP/s", "vs xla", "vs cudnn"]
    if index == 0:
        columns.append("rel. err vs xla")
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def _aims(rows) -> list[str]:
    """The issue's two aims, checked against the measured rows."""
    lines = []
    for row in rows:
        for index, what in ((0, "forward"), (1, "forward+backward")):
            if row["L"] == 2048 and row["mask"].startswith("bd3lm"):
                a, b = row["pallas"], row["xla"]
                if isinstance(a, tuple) and isinstance(b, tuple):
                    speedup = b[index] / a[index]
                    lines.append(f"- two-stream {row['mask']}, L=2048, D={row['D']}, {what}: "
                                 f"{speedup:.2f}x dense-masked XLA (aim >= 2x: "
                                 f"{'met' if speedup >= 2 else 'not met'})")
            if row["mask"] == "full":
                a, b = row["pallas"], row["cudnn"]
                if isinstance(a, tuple) and isinstance(b, tuple):
                    share = b[index] / a[index]
                    lines.append(f"- full, L={row['L']}, D={row['D']}, {what}: {share:.0%} of "
                                 f"cuDNN's speed (aim >= 70%: "
                                 f"{'met' if share >= 0.7 else 'not met'})")
    return lines


def section_body(rows, command: str, backend: str, dtype_name: str, tokens: int,
                 hidden: int, note: str | None = None) -> str:
    """The markdown of this benchmark's section (`note`, if given, right under the title)."""
    sizes = _block_sizes(backend) or BlockSizes.default(backend)
    return "\n".join([
        "## Attention kernels: Pallas block-sparse vs dense-masked XLA vs cuDNN",
        "",
        *([f"**{note}**", ""] if note else []),
        report.provenance(command),
        "",
        f"{dtype_name} q, k, v [B, L, H, D] with B = {tokens} / L and H = {hidden} / D (K = "
        f"H); median of {_ITERS.value} calls after {_WARMUP.value} warm-up calls. `pallas` = "
        f"`pallas_kernels.block_sparse_attention` (backend {backend}, {sizes}); `xla` = "
        "`dlm.models.attention.attend(impl='xla')` (dense logits, mask applied); `cudnn` = "
        "`jax.nn.dot_product_attention(implementation='cudnn')` (is_causal for causal, a dense "
        "boolean mask for bd3lm). L is the attention length (bd3lm: x_t ⊕ x_0, L/2 tokens per "
        "stream); density = allowed pairs / L². TFLOP/s count only unmasked work: 4·B·H·D·pairs "
        "for the forward, 3.5 times that for forward + backward (one VJP giving dq, dk, dv). "
        "vs xla / vs cudnn = that implementation's time / the kernel's time. rel. err = "
        "||pallas - xla|| / ||xla|| of the forward output.",
        "",
        "Forward:",
        "",
        _header(0),
        *[_row_text(r, 0) for r in rows],
        "",
        "Forward + backward:",
        "",
        _header(1),
        *[_row_text(r, 1) for r in rows],
        "",
        "Aims from the issue:",
        "",
        *(_aims(rows) or ["- (no row the aims refer to was measured)"]),
    ])


def main(argv):
    del argv
    platform_name = jax.default_backend()
    command = "python -m experiments.attention_benchmark " + " ".join(sys.argv[1:])
    masks = [MaskSpec.parse(m) for m in _MASKS.value]
    if platform_name == "cpu":
        if not _CPU_SMOKE.value:
            sys.exit(
                "experiments.attention_benchmark: no GPU or TPU here (jax.default_backend() is "
                "'cpu'). On a CPU the Pallas kernels only run in interpret mode, whose times are "
                "not performance figures, so nothing is measured or written. Run this on a GPU "
                f"machine (pip install 'jax[cuda12]=={jax.__version__}'), or pass "
                "--allow_cpu_smoke to check that the script runs on tiny shapes.")
        smoke = ("CPU SMOKE RUN: interpret mode, tiny shapes; the times are NOT performance "
                 "figures and nothing is written.")
        print(smoke, flush=True)
        rows = run_grid([64], [32], masks, "interpret", jnp.float32, tokens=64, hidden=64)
        print(section_body(rows, command, "interpret", "float32", 64, 64, note=smoke))
        return
    backend = "gpu" if platform_name == "gpu" else "tpu"
    rows = run_grid([int(x) for x in _LENGTHS.value], [int(x) for x in _HEAD_DIMS.value],
                    masks, backend, jnp.bfloat16, _TOKENS.value, _HIDDEN.value)
    out = ROOT / _OUT.value
    body = section_body(rows, command, backend, "bfloat16", _TOKENS.value, _HIDDEN.value)
    report.write_section(out, SECTION, body)
    print(f"wrote the '{SECTION}' section of {out}")


if __name__ == "__main__":
    app.run(main)
