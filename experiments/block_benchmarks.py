"""The block-diffusion suites of `experiments.benchmark` (their flags are defined here).

  ladder        the perplexity ladder on Tiny Shakespeare at equal training steps: AR,
                BD3-LM at each of `--ladder_block_sizes`, MDLM (micro, from scratch, same
                seed and data order), scored on the whole validation split; with the
                per-block NELBO variance with and without the searched clip interval;
  bd3lm_cost    sampling time vs generated length for `bd3lm` with and without its KV
                cache and for `mdlm`, on runs of the ladder; the ratio per doubling, and
                the KV-cache memory per sequence.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

from absl import flags

from experiments import report

_LADDER_STEPS = flags.DEFINE_integer("ladder_steps", 500, "Training steps of every `ladder` run.")
_LADDER_SEQ_LEN = flags.DEFINE_integer("ladder_seq_len", 128, "Sequence length for `ladder`.")
_LADDER_BLOCK_SIZES = flags.DEFINE_list("ladder_block_sizes", ["4", "8", "16"],
                                        "BD3-LM block sizes of the `ladder`.")
_LADDER_UNCLIPPED = flags.DEFINE_integer(
    "ladder_unclipped", 4, "Also train BD3-LM at this block size without clipping (0: no).")
_LADDER_SEARCHES = flags.DEFINE_integer(
    "ladder_searches", 5, "Evaluations (and so clip searches) per `ladder` run.")
_LADDER_WORKDIR = flags.DEFINE_string(
    "ladder_workdir", None,
    "Where the `ladder` runs live (ROOT/<name>); finished runs are reused, killed ones "
    "resumed. Unset: a temporary directory.")
_COST_LENGTHS = flags.DEFINE_list("cost_lengths", ["256", "512", "1024", "2048"],
                                  "Generated lengths for `bd3lm_cost`.")
_COST_UNCACHED_MAX = flags.DEFINE_integer(
    "cost_uncached_max_length", 2048,
    "Longest length at which `bd3lm_cost` times the quadratic samplers (no cache, mdlm).")
_COST_BLOCK_SIZE = flags.DEFINE_integer("cost_block_size", 4,
                                        "Block size of the ladder run `bd3lm_cost` samples.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TFDS_DIR = pathlib.Path(tempfile.gettempdir()) / "dlm_benchmark_tfds"


def _ladder_runs() -> list[tuple[str, str, dict]]:
    """(name, config file, overrides) of every ladder run, AR first and MDLM last."""
    runs = [("ar", "configs/ar.py:micro", {})]
    runs += [(f"bd3lm_b{b}", "configs/bd3lm.py:micro", {"block_size": int(b)})
             for b in _LADDER_BLOCK_SIZES.value]
    if _LADDER_UNCLIPPED.value:  # the same b without the clip search: t ~ U[t_min, 1]
        b = _LADDER_UNCLIPPED.value
        runs.append((f"bd3lm_b{b}_unclipped", "configs/bd3lm.py:micro",
                     {"block_size": b, "process.clip_search_widths": "()"}))
    return runs + [("mdlm", "configs/mdlm.py:micro", {})]


def _ladder_root() -> pathlib.Path:
    if _LADDER_WORKDIR.value:
        return pathlib.Path(_LADDER_WORKDIR.value).expanduser().resolve()
    return pathlib.Path(tempfile.mkdtemp(prefix="dlm_ladder_"))


def _train(config: str, workdir: pathlib.Path, overrides: dict) -> None:
    """Trains (or resumes, or finds finished) one run."""
    steps = _LADDER_STEPS.value
    settings = {"total_steps": steps, "eval_every": max(steps // _LADDER_SEARCHES.value, 1),
                "checkpoint_every": max(steps // _LADDER_SEARCHES.value, 1),
                "log_every": 25, "eval.num_batches": 0, "data.seq_len": _LADDER_SEQ_LEN.value,
                "data.data_dir": str(TFDS_DIR), **overrides}
    command = [sys.executable, "-m", "experiments.train", f"--config={config}",
               f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in settings.items()]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def ladder_section(command: str) -> str:
    root = _ladder_root()
    lines_out = []
    for name, config, overrides in _ladder_runs():
        _train(config, root / name, overrides)
        rows = _rows(root / name)
        final = [r for r in rows if "eval/nll_nats_per_token" in r][-1]
        searched = [r for r in rows if "clip/min" in r]
        clip = variance = "—"
        if searched:
            last = searched[-1]
            clip = f"[{last['clip/min']:.1f}, {last['clip/max']:.1f}]"
            variance = (f"{last['clip/nelbo_var']:.3f} / {last['clip/nelbo_var_unclipped']:.3f}")
        lines_out.append(
            f"| {name} | {final['step']} | {final['eval/nll_nats_per_token']:.4f} ± "
            f"{final['eval/nll_stderr']:.4f} | {final['eval/bits_per_token']:.3f} | "
            f"{final['eval/ppl']:.3f} | {clip} | {variance} |")
    steps = _LADDER_STEPS.value
    return "\n".join([
        "## Perplexity ladder: AR, BD3-LM, MDLM (Tiny Shakespeare, micro)",
        "",
        report.provenance(command),
        "",
        f"Every run: its `configs/*.py:micro` settings, {steps} steps from scratch, batch 32 x "
        f"{_LADDER_SEQ_LEN.value} characters, same seed and data order; scored on the whole "
        "validation split with EMA weights and the fixed evaluation seed. AR reports its exact "
        "NLL (L - 1 tokens per sequence), the diffusion models their unclipped NELBO (an upper "
        "bound, one Monte-Carlo draw per sequence; ± is the standard error over sequences). "
        f"BD3-LM searches its training clip interval at each of the {_LADDER_SEARCHES.value} "
        "evaluations (widths 0.5-1.0, step 0.1, 4 validation batches); the variance columns "
        "are the per-block NELBO variance under the chosen interval and under [0, 1] at the "
        f"last search. Runs in `{root}`.",
        "",
        "| run | step | nats/char | bits/char | ppl | clip | NELBO var clipped / unclipped |",
        "|---|---|---|---|---|---|---|",
        *lines_out,
        "",
        "Published ordering (LM1B, 65B tokens; not comparable data): AR 22.83 < BD3-LM L'=4 "
        "28.23 < MDLM 31.78 perplexity. Training speed is not reported here (other jobs may "
        "share the machine while the ladder trains); see the throughput section.",
    ])


def _cache_bytes(rule, network, length: int) -> int:
    """Bytes of the KV cache (keys, values, validity) that `rule` keeps for one sequence."""
    import jax

    rule = rule.for_network(network)
    slots = rule.cache_window(network, length) + network.block_size
    shapes = jax.eval_shape(lambda: network.init_cache_fn(1, slots))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def cost_section(command: str) -> str:
    import jax

    from dlm import runs as runs_lib
    from dlm import sampling

    root = _ladder_root()
    block_run = root / f"bd3lm_b{_COST_BLOCK_SIZE.value}"
    for name, config, overrides in _ladder_runs():
        if root / name in (block_run, root / "mdlm"):
            _train(config, root / name, overrides)
    runs = {"bd3lm": runs_lib.load_run(block_run), "mdlm": runs_lib.load_run(root / "mdlm")}
    samplers = [
        ("bd3lm (KV cache)", "bd3lm", sampling.get_sampler("bd3lm", kv_cache=True)),
        ("bd3lm (no cache)", "bd3lm", sampling.get_sampler("bd3lm", kv_cache=False)),
        ("mdlm (steps = length)", "mdlm", None),
    ]
    results: dict[str, dict[int, dict]] = {label: {} for label, _, _ in samplers}
    memory = {}
    for length in (int(x) for x in _COST_LENGTHS.value):
        for label, run_name, sampler in samplers:
            cached = sampler is not None and sampler.rule.kv_cache
            if not cached and length > _COST_UNCACHED_MAX.value:
                continue
            run = runs[run_name]
            if sampler is None:
                sampler = sampling.get_sampler("mdlm", steps=length)
            drawn = sampling.draw(sampler, run.network, run.params, jax.random.key(0),
                                  batch_size=1, length=length)
            results[label][length] = {"seconds": drawn.seconds[0],
                                      "nfe": int(drawn.output.nfe_B.max()),
                                      "compile": drawn.compile_seconds}
            if cached:
                memory[length] = _cache_bytes(sampler.rule, run.network, length)
    lengths = sorted({n for r in results.values() for n in r})
    header = ("| sampler | " + " | ".join(f"{n} s (NFE)" for n in lengths) +
              " | ratio per doubling |")
    rows = []
    for label, by_length in results.items():
        cells = [f"{by_length[n]['seconds']:.2f} ({by_length[n]['nfe']})" if n in by_length
                 else "—" for n in lengths]
        present = [n for n in lengths if n in by_length]
        ratios = [by_length[b]["seconds"] / by_length[a]["seconds"]
                  for a, b in zip(present, present[1:])]
        rows.append(f"| {label} | " + " | ".join(cells) + " | " +
                    ", ".join(f"{r:.2f}" for r in ratios) + " |")
    memory_text = ", ".join(f"{n}: {memory[n] / 2**10:,.0f} KiB" for n in sorted(memory))
    return "\n".join([
        "## BD3-LM sampling cost vs generated length",
        "",
        report.provenance(command),
        "",
        f"Runs of the ladder (`{block_run}` and `{root / 'mdlm'}`), batch 1, no prompt, "
        "one sample per cell timed after compiling (compile excluded). `bd3lm`: first-hitting "
        "within blocks (one token per network call on the current block) plus one call per "
        "committed block to encode it into the KV cache; the cache is a sliding window of the "
        "training context (older blocks dropped), so every step costs the same and the time "
        "should double with the length (ratio 2). Without the cache every step is a full "
        "forward pass over the whole sequence; `mdlm` makes `length` full forward passes. "
        "Both make L calls that each cost at least linearly in L (MLP) and quadratically in "
        "attention, so they grow between 4x and 8x per doubling.",
        "",
        header,
        "|---|" + "---|" * (len(lengths) + 1),
        *rows,
        "",
        f"KV-cache memory per sequence (`bd3lm`, float32 keys and values of every layer over "
        f"the window, validity mask included): {memory_text}.",
    ])
