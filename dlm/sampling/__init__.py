"""Sampling: one jit-compiled while_loop engine, small policies, and named recipes.

    sampler = get_sampler("fast_dllm", threshold=0.9)
    network = from_flax(model, process, tokenizer)  # a Denoiser, BlockDenoiser or CausalLM
    drawn = draw(sampler, network, params, rng, batch_size=4, length=128, prompt=ids)
    drawn.output.tokens_BL, drawn.output.nfe_B, drawn.seconds

Every sampler takes one kind of network (`NETWORK_KINDS`); `check_network` says whether it
fits, and which samplers do (`samplers_for`).
"""

from dlm.sampling.engine import Drawn, Sampler, check_network, draw, prefix_inputs, run
from dlm.sampling.importance import ARResidualEnergy, LearnedEnergy, energy_from_flax
from dlm.sampling.networks import (
    NETWORK_KINDS,
    BlockDenoiser,
    CausalLM,
    Denoiser,
    DraftedCausalLM,
    EnergyDenoiser,
    Vocab,
    from_flax,
)
from dlm.sampling.recipes import SAMPLERS, Decoding, get_sampler, options, samplers_for
from dlm.sampling.state import SampleOutput, SamplerState

__all__ = [
    "ARResidualEnergy",
    "BlockDenoiser",
    "CausalLM",
    "Decoding",
    "Denoiser",
    "DraftedCausalLM",
    "Drawn",
    "EnergyDenoiser",
    "LearnedEnergy",
    "NETWORK_KINDS",
    "SAMPLERS",
    "SampleOutput",
    "Sampler",
    "SamplerState",
    "Vocab",
    "check_network",
    "draw",
    "energy_from_flax",
    "from_flax",
    "get_sampler",
    "options",
    "prefix_inputs",
    "run",
    "samplers_for",
]
