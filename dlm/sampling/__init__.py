"""Sampling: one jit-compiled while_loop engine, small policies, and named recipes.

    sampler = get_sampler("fast_dllm", threshold=0.9)
    network = from_flax(model, process, tokenizer)  # a Denoiser, BlockDenoiser or CausalLM
    out = generate(sampler, network, params, rng, batch_size=4, length=128, prompt=ids)
    out.tokens_BL, out.nfe
"""

from dlm.sampling.engine import Sampler, generate, infill, prefix_inputs, run, sampler_fn
from dlm.sampling.networks import BlockDenoiser, CausalLM, Denoiser, Vocab, from_flax
from dlm.sampling.recipes import AUTOREGRESSIVE, BLOCK, SAMPLERS, get_sampler, options
from dlm.sampling.state import SampleOutput, SamplerState

__all__ = [
    "AUTOREGRESSIVE",
    "BLOCK",
    "BlockDenoiser",
    "SAMPLERS",
    "CausalLM",
    "Denoiser",
    "SampleOutput",
    "Sampler",
    "SamplerState",
    "Vocab",
    "from_flax",
    "generate",
    "get_sampler",
    "infill",
    "options",
    "prefix_inputs",
    "run",
    "sampler_fn",
]
