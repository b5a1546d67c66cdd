r"""Samples from a trained run and scores the samples.

    python -m experiments.sample --workdir=DIR --sampler=NAME --num_samples=N --length=L \
        [--steps=S] [--prompt=TEXT] [--seed=N] [--judge_workdir=DIR] \
        [--sampler_config.KEY=VALUE ...] --out=FILE.jsonl

Writes one JSON object per sample (`text`, `tokens` (the whole sequence, prompt included),
`prompt_tokens`, `nfe`, `seconds`: its batch's sampling time divided by the batch size) and
prints one summary line (`sampler`, `num_samples`, `tokens_per_second`, `mean_nfe`,
`entropy`, `compile_seconds`, and `gen_ppl` with a judge). `--sampler_config.KEY=VALUE` sets
any option of the sampler (see `dlm.sampling.recipes`), e.g. `--sampler_config.threshold=0.8`.
An AR run without a prompt starts from the tokenizer's BOS.
"""

from __future__ import annotations

import ast
import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags

from dlm import sampling
from dlm.evaluation import generative
from dlm.sampling import engine, loading, recipes

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to sample from.")
_SAMPLER = flags.DEFINE_string("sampler", "mdlm", f"One of {', '.join(recipes.SAMPLERS)}.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "How many samples.")
_LENGTH = flags.DEFINE_integer("length", None,
                               "Tokens per sample, prompt included (default: the run's "
                               "data.seq_len).")
_STEPS = flags.DEFINE_integer("steps", None, "The sampler's `steps` option.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text every sample continues.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Samples drawn together.")
_JUDGE = flags.DEFINE_string("judge_workdir", None,
                             "An AR run (same tokenizer) to score generative perplexity.")
_OUT = flags.DEFINE_string("out", None, "Where to write the samples (JSON lines).")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "Checkpoint to load (default: latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", None,
                             "Sample with the EMA weights (default: the run's eval.use_ema).")
flags.mark_flags_as_required(["workdir", "out"])

SAMPLER_CONFIG_PREFIX = "--sampler_config."


def parse_value(text: str):
    """A flag value as a Python literal (int, float, bool, None) or else the string."""
    lowered = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


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
    wants_ar = sampler.name in recipes.AUTOREGRESSIVE
    if wants_ar != run.is_autoregressive:
        kind = "an autoregressive" if run.is_autoregressive else "a masked diffusion"
        raise ValueError(f"sampler {sampler.name!r} cannot sample {kind} run ({run.workdir}); "
                         f"use {'ar' if run.is_autoregressive else 'a diffusion sampler'}")
    if judge is None:
        return
    if not judge.is_autoregressive:
        raise ValueError(f"the judge {judge.workdir} is not an autoregressive run")
    if judge.tokenizer_state() != run.tokenizer_state():
        raise ValueError(
            f"the judge {judge.workdir} uses another tokenizer ({judge.tokenizer.name}, "
            f"vocab {judge.tokenizer.vocab_size}) than {run.workdir} ({run.tokenizer.name}, "
            f"vocab {run.tokenizer.vocab_size}): its perplexity would be meaningless")


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
        outputs.append(jax.device_get(out))
    tokens = np.concatenate([o.tokens_BL for o in outputs])[:num_samples]
    nfe = np.concatenate([o.nfe_B for o in outputs])[:num_samples]
    per_sample_seconds = np.repeat(np.array(seconds) / batch_size, batch_size)[:num_samples]

    tokenizer = run.tokenizer
    stop = sampler.stop
    scored = generative.scored_mask(
        tokens, mask_id=run.network.vocab.mask_id, pad_id=tokenizer.pad_id,
        end_id=tokenizer.eos_id if stop.at_eos else None, start_BL=~np.asarray(known_BL)[:1])
    generated = scored & ~np.asarray(known_BL)[:1]
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
                   use_ema: bool | None = None) -> dict:
    """The command line as a function: writes `out` (JSON lines), returns the summary."""
    # Every check that needs no weights comes before loading them.
    sampler = make_sampler(sampler_name, steps, overrides)
    files = loading.read_run(workdir)
    judge_files = loading.read_run(judge_workdir) if judge_workdir else None
    check_compatible(sampler, files, judge_files)
    length = length or int(files.config.data.seq_len)
    prompt_tokens(files, prompt, length)
    run = loading.load_run(files, checkpoint_step, use_ema)
    judge = loading.load_run(judge_files) if judge_files else None
    records, summary = draw(run, sampler, num_samples=num_samples, length=length,
                            prompt=prompt, seed=seed, batch_size=batch_size, judge=judge)
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


def parse_flags(argv: list[str]) -> tuple[list[str], dict]:
    """absl parsing, with `--sampler_config.KEY=VALUE` taken out first; returns (the
    remaining argv, {KEY: value})."""
    overrides, rest = {}, []
    for arg in argv:
        if arg.startswith(SAMPLER_CONFIG_PREFIX):
            key, sep, value = arg[len(SAMPLER_CONFIG_PREFIX):].partition("=")
            if not sep or not key:
                raise app.UsageError(f"expected {SAMPLER_CONFIG_PREFIX}KEY=VALUE, got {arg!r}")
            overrides[key] = parse_value(value)
        else:
            rest.append(arg)
    return flags.FLAGS(rest), overrides


def main(parsed):
    argv, overrides = parsed
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = sample_to_file(
        _WORKDIR.value, _SAMPLER.value, _OUT.value, num_samples=_NUM_SAMPLES.value,
        length=_LENGTH.value, steps=_STEPS.value, prompt=_PROMPT.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, judge_workdir=_JUDGE.value, overrides=overrides,
        checkpoint_step=_CHECKPOINT_STEP.value, use_ema=_USE_EMA.value)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
