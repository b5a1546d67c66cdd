"""Drawing samples from a trained run and scoring them: the library behind experiments.sample.

`sample_to_file` is the command line as a function; `print_samples` shows a few samples
(the demo's last step); `draw` samples and scores an already loaded run.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from dlm import sampling
from dlm.evaluation import generative
from dlm.sampling import engine, loading, recipes
from dlm.training import distributed


def make_sampler(name: str, steps: int | None = None, overrides: dict | None = None):
    """The sampler `name` with `--steps` and `--sampler_config.*` applied (ValueError if the
    name or an option is unknown)."""
    overrides = dict(overrides or {})
    if steps is not None:
        if "steps" not in recipes.options(name):
            raise ValueError(f"sampler {name!r} has no steps option; drop --steps")
        overrides["steps"] = steps
    return sampling.get_sampler(name, **overrides)


def check_compatible(sampler, run: loading.RunFiles, judge: loading.RunFiles | None = None
                     ) -> None:
    """Raises ValueError when the sampler does not fit the run's network, or the judge is not
    a causal model with the same tokenizer."""
    if run.is_energy:
        raise ValueError(f"{run.workdir} is an EDLM energy run, not a sampler: pass it as "
                         "--energy_workdir with --sampler=edlm and --workdir=<its MDLM run>")
    wants_ar = sampler.name in recipes.AUTOREGRESSIVE
    wants_block = sampler.name in recipes.BLOCK
    if wants_ar != run.is_autoregressive or wants_block != run.is_block:
        if run.is_autoregressive:
            kind, use = "an autoregressive", "ar"
        elif run.is_block:
            kind, use = "a block diffusion", ", ".join(recipes.BLOCK)
        else:
            kind, use = "a masked diffusion", "a diffusion sampler"
        raise ValueError(f"sampler {sampler.name!r} cannot sample {kind} run ({run.workdir}); "
                         f"use {use}")
    if judge is None:
        return
    if not judge.is_autoregressive:
        raise ValueError(f"the judge {judge.workdir} is not an autoregressive run")
    if judge.tokenizer_state() != run.tokenizer_state():
        raise ValueError(
            f"the judge {judge.workdir} uses another tokenizer ({judge.tokenizer.name}, "
            f"vocab {judge.tokenizer.vocab_size}) than {run.workdir} ({run.tokenizer.name}, "
            f"vocab {run.tokenizer.vocab_size}): its perplexity would be meaningless")


def check_length(run: loading.RunFiles, length: int) -> None:
    """Raises ValueError when a block diffusion run cannot sample `length` tokens (blocks
    are aligned to positions 0, b, 2b, ..., so b must divide it)."""
    block_size = run.block_size
    if block_size and length % block_size:
        raise ValueError(f"--length={length} must be a multiple of the run's block size "
                         f"{block_size}")


def prompt_tokens(run: loading.RunFiles, prompt: str, length: int) -> np.ndarray:
    """int32 [P]: the encoded prompt (BOS alone for an AR run without one)."""
    tokens = run.tokenizer.encode(prompt) if prompt else np.zeros((0,), np.int32)
    if run.is_autoregressive and tokens.size == 0:
        tokens = np.array([run.tokenizer.bos_id], np.int32)
    if tokens.size > length:
        raise ValueError(f"the prompt is {tokens.size} tokens long, more than "
                         f"--length={length}")
    return tokens.astype(np.int32)


def draw(run: loading.Run, sampler, *, num_samples: int, length: int, prompt: str = "",
         seed: int = 0, batch_size: int = 16, judge: loading.Run | None = None
         ) -> tuple[list[dict], dict]:
    """Samples and scores. Returns (one record per sample, the summary).

    Every batch has the same shape (the last is filled up and trimmed), so the sampler is
    compiled once; compilation is timed apart from sampling.
    """
    check_compatible(sampler, run, judge)
    prompt_ids = prompt_tokens(run, prompt, length)
    batch_size = min(batch_size, num_samples)
    tokens_BL, known_BL, prompt_len = engine.prefix_inputs(
        prompt_ids, batch_size, length, run.network.vocab.mask_id)
    prefix_len = engine.static_prefix(sampler, prompt_len)
    sharding = loading.batch_sharding(run, batch_size)
    known_host_BL = known_BL  # numpy: the device copy may be split over processes
    tokens_BL, known_BL = (jax.device_put(x, sharding) for x in (tokens_BL, known_BL))
    rng = jax.random.PRNGKey(seed)
    start = time.perf_counter()
    sample_fn = engine.compile_run(sampler, run.network, run.params, tokens_BL, known_BL, rng,
                                   prefix_len)
    compile_seconds = time.perf_counter() - start

    outputs, seconds = [], []
    for index in range(-(-num_samples // batch_size)):
        start = time.perf_counter()
        out = jax.block_until_ready(sample_fn(run.params, tokens_BL, known_BL,
                                              jax.random.fold_in(rng, index)))
        seconds.append(time.perf_counter() - start)
        outputs.append(distributed.fetch(out))
    tokens = np.concatenate([o.tokens_BL for o in outputs])[:num_samples]
    nfe = np.concatenate([o.nfe_B for o in outputs])[:num_samples]
    per_sample_seconds = np.repeat(np.array(seconds) / batch_size, batch_size)[:num_samples]

    tokenizer = run.tokenizer
    stop = sampler.stop
    scored = generative.scored_mask(
        tokens, mask_id=run.network.vocab.mask_id, pad_id=tokenizer.pad_id,
        end_id=tokenizer.eos_id if stop.at_eos else None, start_BL=~known_host_BL[:1])
    generated = scored & ~known_host_BL[:1]
    records = [{
        "text": tokenizer.decode(row[keep]),
        "tokens": row.tolist(),
        "prompt_tokens": prompt_ids.tolist(),
        "nfe": int(calls),
        "seconds": float(secs),
    } for row, keep, calls, secs in zip(tokens, scored, nfe, per_sample_seconds)]

    total_seconds = float(np.sum(seconds)) * num_samples / (len(seconds) * batch_size)
    summary = {
        "sampler": sampler.name,
        "num_samples": num_samples,
        "length": length,
        **generative.speed(int(generated.sum()), total_seconds, float(nfe.mean())),
        "compile_seconds": compile_seconds,
        "entropy": float(np.mean([generative.unigram_entropy(row[keep])
                                  for row, keep in zip(tokens, generated)])),
    }
    if judge is not None:
        window = int(judge.config.data.seq_len)
        nll_fn = generative.make_judge_nll(judge.module, window=window)
        nll, count = jax.device_get(nll_fn(judge.params, tokens, scored))
        summary["gen_ppl"] = generative.generative_perplexity(nll, count)
    return records, summary


def sample_to_file(workdir: str, sampler_name: str, out: str, *, num_samples: int,
                   length: int | None = None, steps: int | None = None, prompt: str = "",
                   seed: int = 0, batch_size: int = 16, judge_workdir: str | None = None,
                   overrides: dict | None = None, checkpoint_step: int | None = None,
                   use_ema: bool | None = None, energy_workdir: str | None = None) -> dict:
    """The command line as a function: writes `out` (JSON lines), returns the summary."""
    # Every check that needs no weights comes before loading them.
    sampler = make_sampler(sampler_name, steps, overrides)
    wants_energy = sampler.name in recipes.ENERGY
    if wants_energy != bool(energy_workdir):
        raise ValueError(f"sampler {sampler_name!r} needs --energy_workdir" if wants_energy
                         else f"--energy_workdir is only for {', '.join(recipes.ENERGY)}")
    files = loading.read_run(workdir)
    judge_files = loading.read_run(judge_workdir) if judge_workdir else None
    check_compatible(sampler, files, judge_files)
    length = length or int(files.config.data.seq_len)
    prompt_tokens(files, prompt, length)
    check_length(files, length)
    run = loading.load_run(files, checkpoint_step, use_ema)
    if energy_workdir:
        run = loading.with_energy(run, loading.load_run(energy_workdir))
    judge = loading.load_run(judge_files) if judge_files else None
    records, summary = draw(run, sampler, num_samples=num_samples, length=length,
                            prompt=prompt, seed=seed, batch_size=batch_size, judge=judge)
    if distributed.is_main_process():  # every process drew the same samples
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return summary


def print_samples(workdir: str, sampler_name: str = "mdlm", num_samples: int = 3,
                  length: int | None = None, steps: int | None = None, prompt: str = "",
                  seed: int = 0, use_ema: bool | None = None, **overrides) -> list[str]:
    """Prints (and returns) a few samples of the run in `workdir`, e.g. at the end of a demo.

    `overrides` are options of the sampler (see `dlm.sampling.recipes`).
    """
    sampler = make_sampler(sampler_name, steps, overrides)
    run = loading.load_run(workdir, use_ema=use_ema)
    length = length or int(run.config.data.seq_len)
    records, summary = draw(run, sampler, num_samples=num_samples, length=length,
                            prompt=prompt, seed=seed, batch_size=num_samples)
    print(f"{num_samples} samples ({sampler_name}, {length} tokens, "
          f"{summary['mean_nfe']:.0f} network calls each):")
    for i, record in enumerate(records):
        print(f"--- sample {i}\n{record['text']}")
    return [record["text"] for record in records]
