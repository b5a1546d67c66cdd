"""Sampling a trained run and scoring the samples: the library behind experiments.sample,
the notebooks and the benchmarks.

`sample` draws from a loaded run (through `dlm.sampling.draw`, the one way to draw) and
scores the samples; `sample_to_file` is the command line as a function; `print_samples`
shows a few (the demo's last step).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from dlm import models, sampling
from dlm.data import sft
from dlm.evaluation import generative
from dlm.parallel import distributed
from dlm.runs import loading
from dlm.runs.workdir import RunFiles, read_run

# The network kind of a denoiser corrected by an energy run (`--energy_workdir`): the
# EnergyDenoiser's, named once in dlm.sampling.networks; of an AR run with a masked
# diffusion run drafting for it (`--drafter_workdir`): the DraftedCausalLM's.
_WITH_ENERGY = sampling.EnergyDenoiser.kind
_WITH_DRAFTER = sampling.DraftedCausalLM.kind


def make_sampler(name: str, steps: int | None = None, overrides: dict | None = None):
    """The sampler `name` with `--steps` and `--sampler_config.*` applied (ValueError if the
    name or an option is unknown)."""
    overrides = dict(overrides or {})
    if steps is not None:
        if "steps" not in sampling.options(name):
            raise ValueError(f"sampler {name!r} has no steps option; drop --steps")
        overrides["steps"] = steps
    return sampling.get_sampler(name, **overrides)


def check_compatible(sampler, run: RunFiles, judge: RunFiles | None = None,
                     energy: RunFiles | None = None, drafter: RunFiles | None = None) -> None:
    """Raises ValueError when the sampler does not fit the run's network (with the energy of
    `energy`, an AR or EDLM-NCE run, or the masked diffusion `drafter`, when given), or the
    judge is not a causal model with the same tokenizer. Reads no weights."""
    for companion, kind, flag in ((energy, _WITH_ENERGY, "--energy_workdir"),
                                  (drafter, _WITH_DRAFTER, "--drafter_workdir")):
        wanted = sampler.rule.network_kind == kind
        if wanted and companion is None:
            raise ValueError(f"sampler {sampler.name!r} needs {flag}")
        if companion is not None and not wanted:
            raise ValueError(f"{flag} is only for {', '.join(sampling.samplers_for(kind))}")
    if run.network_kind == "energy":
        raise ValueError(f"{run.workdir} is an EDLM energy run, not a sampler: pass it as "
                         "--energy_workdir with --sampler=edlm and --workdir=<its MDLM run>")
    kind = run.network_kind
    if energy is not None and kind == "denoiser":
        kind = _WITH_ENERGY
    if drafter is not None and kind == "causal":
        if drafter.network_kind != "denoiser":
            raise ValueError(f"the drafter {drafter.workdir} is not a masked diffusion run")
        kind = _WITH_DRAFTER
    sampling.check_network(sampler, kind, f"run ({run.workdir})")
    if judge is not None:
        _check_judge(run, judge)


def _check_judge(run: RunFiles, judge: RunFiles) -> None:
    if judge.network_kind != "causal":
        raise ValueError(f"the judge {judge.workdir} is not an autoregressive run")
    if judge.tokenizer_state() != run.tokenizer_state():
        raise ValueError(
            f"the judge {judge.workdir} uses another tokenizer ({judge.tokenizer.name}, "
            f"vocab {judge.tokenizer.vocab_size}) than {run.workdir} ({run.tokenizer.name}, "
            f"vocab {run.tokenizer.vocab_size}): its perplexity would be meaningless")


def check_length(run: RunFiles, length: int) -> None:
    """Raises ValueError when a block diffusion run cannot sample `length` tokens (blocks
    are aligned to positions 0, b, 2b, ..., so b must divide it)."""
    block_size = run.block_size
    if block_size and length % block_size:
        raise ValueError(f"--length={length} must be a multiple of the run's block size "
                         f"{block_size}")


def prompt_tokens(run: RunFiles, sampler, prompt: str, length: int, *, chat: bool = False
                  ) -> np.ndarray:
    """int32 [P]: the encoded prompt (BOS alone for a sampler that needs a prefix, AR);
    with `chat`, the prompt as a user turn of the tokenizer's chat template."""
    if chat:
        tokens = sft.chat_prompt(run.tokenizer, prompt)
    else:
        tokens = run.tokenizer.encode(prompt) if prompt else np.zeros((0,), np.int32)
    if sampler.rule.uses_prefix and tokens.size == 0:
        tokens = np.array([run.tokenizer.bos_id], np.int32)
    if tokens.size > length:
        raise ValueError(f"the prompt is {tokens.size} tokens long, more than "
                         f"--length={length}")
    return tokens.astype(np.int32)


def sample(run: loading.Run, sampler, *, num_samples: int, length: int, prompt: str = "",
           seed: int = 0, batch_size: int = 16, judge: loading.Run | None = None,
           chat: bool = False) -> tuple[list[dict], dict]:
    """Samples and scores. Returns (one record per sample, the summary).

    Every batch has the same shape (the last is filled up and trimmed), so the sampler is
    compiled once; compilation is timed apart from sampling.
    """
    if run.network is None:  # an energy run: check_compatible says so
        check_compatible(sampler, run)
    sampling.check_network(sampler, run.network.kind, f"run ({run.workdir})")
    if judge is not None:
        _check_judge(run, judge)
    prompt_ids = prompt_tokens(run, sampler, prompt, length, chat=chat)
    batch_size = min(batch_size, num_samples)
    drawn = sampling.draw(sampler, run.network, run.params, jax.random.PRNGKey(seed),
                          batch_size=batch_size, length=length, prompt=prompt_ids,
                          num_batches=-(-num_samples // batch_size),
                          sharding=loading.batch_sharding(run, batch_size),
                          fetch=distributed.fetch)
    tokens = drawn.output.tokens_BL[:num_samples]
    nfe = drawn.output.nfe_B[:num_samples]
    token_forwards = drawn.output.token_forwards_B[:num_samples]
    seconds = np.asarray(drawn.seconds)
    per_sample_seconds = np.repeat(seconds / batch_size, batch_size)[:num_samples]
    known_BL = drawn.known_BL

    tokenizer = run.tokenizer
    scored = generative.scored_mask(
        tokens, mask_id=run.network.vocab.mask_id, pad_id=tokenizer.pad_id,
        end_id=tokenizer.eos_id if sampler.stop.at_eos else None, start_BL=~known_BL[:1])
    generated = scored & ~known_BL[:1]
    records = [{
        "text": tokenizer.decode(row[keep]),
        "tokens": row.tolist(),
        "prompt_tokens": prompt_ids.tolist(),
        "nfe": int(calls),
        "token_forwards": int(forwards),
        "seconds": float(secs),
    } for row, keep, calls, forwards, secs in zip(tokens, scored, nfe, token_forwards,
                                                  per_sample_seconds)]

    total_seconds = float(np.sum(seconds)) * num_samples / (len(seconds) * batch_size)
    forwards_per_token = float(token_forwards.sum()) / max(int(generated.sum()), 1)
    summary = {
        "sampler": sampler.name,
        "num_samples": num_samples,
        "length": length,
        **generative.speed(int(generated.sum()), total_seconds, float(nfe.mean())),
        "compile_seconds": drawn.compile_seconds,
        # Query positions the network processed per generated token, and their attention
        # FLOPs (every query attends over the `length` slots of the sequence or its cache).
        "token_forwards_per_token": forwards_per_token,
        "attention_flops_per_token": float(models.attention_flops(
            run.config.model, forwards_per_token, length)),
        "entropy": float(np.mean([generative.unigram_entropy(row[keep])
                                  for row, keep in zip(tokens, generated)])),
        "mean_remasked": float(np.mean(drawn.output.remasked_B[:num_samples])),
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
                   use_ema: bool | None = None, energy_workdir: str | None = None,
                   drafter_workdir: str | None = None, chat: bool = False,
                   model_parallel: int = 1) -> dict:
    """The command line as a function: writes `out` (JSON lines), returns the summary."""
    # Every check that needs no weights comes before loading them.
    sampler = make_sampler(sampler_name, steps, overrides)
    files = read_run(workdir)
    judge_files = read_run(judge_workdir) if judge_workdir else None
    energy_files = read_run(energy_workdir) if energy_workdir else None
    drafter_files = read_run(drafter_workdir) if drafter_workdir else None
    check_compatible(sampler, files, judge_files, energy_files, drafter_files)
    length = length or int(files.config.data.seq_len)
    prompt_tokens(files, sampler, prompt, length, chat=chat)
    check_length(files, length)
    run = loading.load_run(files, checkpoint_step, use_ema, model_parallel=model_parallel)
    run = with_companions(run, energy_files, drafter_files)
    judge = loading.load_run(judge_files) if judge_files else None
    records, summary = sample(run, sampler, num_samples=num_samples, length=length,
                              prompt=prompt, seed=seed, batch_size=batch_size, judge=judge,
                              chat=chat)
    if distributed.is_main_process():  # every process drew the same samples
        write_json_lines(out, records)
    return summary


def with_companions(run: loading.Run, energy: RunFiles | None,
                    drafter: RunFiles | None) -> loading.Run:
    """`run` with the energy run (EDLM) or the drafter run (DiffuSpec, AR-guided) loaded
    into its network, when given."""
    if energy is not None:
        run = loading.with_energy(run, loading.load_run(energy))
    if drafter is not None:
        run = loading.with_drafter(run, loading.load_run(drafter))
    return run


def write_json_lines(out, records) -> None:
    """Writes one JSON object per record to the file `out` (its folder created)."""
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def print_samples(workdir: str, sampler_name: str = "mdlm", num_samples: int = 3,
                  length: int | None = None, steps: int | None = None, prompt: str = "",
                  seed: int = 0, use_ema: bool | None = None, **overrides) -> list[str]:
    """Prints (and returns) a few samples of the run in `workdir`, e.g. at the end of a demo.

    `overrides` are options of the sampler (see `dlm.sampling.recipes`).
    """
    sampler = make_sampler(sampler_name, steps, overrides)
    run = loading.load_run(workdir, use_ema=use_ema)
    length = length or int(run.config.data.seq_len)
    records, summary = sample(run, sampler, num_samples=num_samples, length=length,
                              prompt=prompt, seed=seed, batch_size=num_samples)
    print(f"{num_samples} samples ({sampler_name}, {length} tokens, "
          f"{summary['mean_nfe']:.0f} network calls each):")
    for i, record in enumerate(records):
        print(f"--- sample {i}\n{record['text']}")
    return [record["text"] for record in records]
