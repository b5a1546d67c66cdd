r"""Samples from a trained run and scores the samples.

    python -m experiments.sample --workdir=DIR --sampler=NAME --num_samples=N --length=L \
        [--steps=S] [--prompt=TEXT] [--seed=N] [--judge_workdir=DIR] \
        [--energy_workdir=DIR] [--drafter_workdir=DIR] [--chat] [--model_parallel=N] \
        [--sampler_config.KEY=VALUE ...] --out=FILE.jsonl

Writes one JSON object per sample (`text`, `tokens` (the whole sequence, prompt included),
`prompt_tokens`, `nfe`, `seconds`: its batch's sampling time divided by the batch size) and
prints one summary line (`sampler`, `num_samples`, `tokens_per_second`, `mean_nfe`,
`entropy`, `compile_seconds`, and `gen_ppl` with a judge). `--sampler_config.KEY=VALUE` sets
any option of the sampler (see `dlm.sampling.recipes`), e.g. `--sampler_config.threshold=0.8`.
An AR run without a prompt starts from the tokenizer's BOS. `--sampler=edlm` needs
`--energy_workdir`: an AR run (EDLM-AR) or an EDLM-NCE run, with the same tokenizer;
`--sampler=diffuspec` (an AR `--workdir`) needs `--drafter_workdir`, a masked diffusion run.
`--workdir` may be a pretrained Hugging Face folder (Llama, Qwen2, LLaDA, Dream; see
`dlm.runs.pretrained`); `--chat` puts the prompt in its chat template; `--model_parallel=N`
splits the params over N devices per tensor-parallel group.
"""

from __future__ import annotations

import json

from absl import app, flags

from dlm import runs, sampling
from dlm.parallel import distributed
from experiments import cli, run_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to sample from, or a "
                                "pretrained Hugging Face folder (Llama, Qwen2, LLaDA, Dream).")
_SAMPLER = flags.DEFINE_string("sampler", "mdlm", f"One of {', '.join(sampling.SAMPLERS)}.")
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
_ENERGY = flags.DEFINE_string("energy_workdir", None,
                              "The energy of --sampler=edlm: an AR run (EDLM-AR) or an "
                              "EDLM-NCE run (configs/edlm.py), same tokenizer as --workdir.")
_DRAFTER = flags.DEFINE_string("drafter_workdir", None,
                               "The masked diffusion run drafting for the AR --workdir "
                               "(--sampler=diffuspec), same tokenizer.")
_OUT = flags.DEFINE_string("out", None, "Where to write the samples (JSON lines).")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "Checkpoint to load (default: latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", None,
                             "Sample with the EMA weights (default: the run's eval.use_ema).")
flags.mark_flags_as_required(["workdir", "out"])
distributed.define_flags()

def main(parsed):
    argv, overrides = parsed
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    summary = runs.sample_to_file(
        _WORKDIR.value, _SAMPLER.value, _OUT.value, num_samples=_NUM_SAMPLES.value,
        length=_LENGTH.value, steps=_STEPS.value, prompt=_PROMPT.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, judge_workdir=_JUDGE.value, overrides=overrides,
        checkpoint_step=_CHECKPOINT_STEP.value, use_ema=_USE_EMA.value,
        energy_workdir=_ENERGY.value, drafter_workdir=_DRAFTER.value,
        chat=run_flags.CHAT.value,
        model_parallel=run_flags.MODEL_PARALLEL.value)
    if distributed.is_main_process():
        print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main, "experiments.sample", flags_parser=cli.parse_flags)
