"""Loading a trained run's weights: for sampling (`load_run`) and as the source of a new run
(`load_weights`, `config.init_from`). Neither builds an optimizer or reads training data.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dlm import sampling
from dlm.data import sft
from dlm.models import registry as model_registry
from dlm.parallel import (
    DATA_AXIS,
    MODEL_AXIS,
    make_mesh,
    state_sharding,
    tensor_parallel_sharding,
)
from dlm.runs import checkpoint as checkpoint_lib
from dlm.runs import pretrained
from dlm.runs.workdir import RunFiles, read_run


@dataclasses.dataclass(frozen=True)
class Run(RunFiles):
    """A trained run, ready to sample from."""

    module: Any = None  # flax.linen.Module
    network: Any = None  # a dlm.sampling network (Denoiser, BlockDenoiser, CausalLM, ...)
    params: Any = None  # laid out on `mesh` as in training (replicated or FSDP)
    mesh: Any = None  # jax.sharding.Mesh
    step: int = -1


def _restore_params(files: RunFiles, mesh, step: int | None, *, fsdp: bool,
                    param_dtype: str | None = None) -> tuple[Any, Any, int]:
    """(module, {"params", "ema_params"} restored from checkpoint `step`, step); a
    pretrained folder's weights (step 0) are read from its safetensors into their shards."""
    config = files.config
    module = model_registry.build_model(config.model, files.tokenizer.vocab_size)
    abstract = jax.eval_shape(functools.partial(
        model_registry.init_params, module, int(config.data.seq_len)), jax.random.PRNGKey(0))
    if mesh.shape[MODEL_AXIS] > 1:  # inference split over the model axis
        shardings = tensor_parallel_sharding(abstract, mesh)
    else:
        shardings = state_sharding(abstract, mesh, fsdp=fsdp)
    if files.pretrained is not None:
        if step not in (None, 0):
            raise ValueError(f"{files.workdir} is a pretrained folder: it has no checkpoint "
                             f"step {step}")
        params = pretrained.params(files.pretrained, shardings=shardings,
                                   param_dtype=param_dtype)
        return module, {"params": params, "ema_params": None}, 0
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    loaded, step = checkpoint_lib.restore_fields(
        files.workdir, {"params": abstract, "ema_params": abstract}, step=step)
    return module, loaded, step


def load_run(workdir_or_files, step: int | None = None, use_ema: bool | None = None, *,
             model_parallel: int = 1, param_dtype: str | None = None) -> Run:
    """The run (a workdir, a pretrained folder, or its `read_run`) at checkpoint `step`
    (default: latest), with its EMA weights when it has them and `use_ema` (default: the
    run's `eval.use_ema`) allows. The params are laid out as in training (`config.fsdp`),
    or with `model_parallel` > 1 split over that many devices per `model` group
    (`parallel.tensor_parallel_sharding`; batches split over the rest). A pretrained
    folder's weights are float32 unless `param_dtype='bfloat16'` (half the memory of an 8B
    model; the matmuls run in `model.dtype` either way).

    Raises FileNotFoundError when the workdir, its tokenizer or the checkpoint is missing.
    """
    files = workdir_or_files
    if not isinstance(files, RunFiles):
        files = read_run(files)
    config = files.config
    mesh = make_mesh(model=model_parallel)
    if param_dtype is not None and files.pretrained is None:
        raise ValueError(f"param_dtype applies to pretrained folders; {files.workdir} is a "
                         "training run (its checkpoint keeps its float32 params)")
    module, loaded, step = _restore_params(files, mesh, step,
                                           fsdp=bool(config.get("fsdp", False)),
                                           param_dtype=param_dtype)
    use_ema = config.eval.get("use_ema", True) if use_ema is None else use_ema
    params = loaded["ema_params"] if use_ema and loaded["ema_params"] is not None \
        else loaded["params"]
    network = None
    if files.network_kind != "energy":  # an energy run corrects a denoiser (`with_energy`)
        network = sampling.from_flax(module, files.process, files.tokenizer,
                                     context_len=int(config.data.seq_len),
                                     pad_unattended=sft.pad_unattended(config.data))
    return Run(files.workdir, config, files.tokenizer, files.process, files.pretrained,
               module=module, network=network, params=params, mesh=mesh, step=int(step))


def load_weights(workdir: str | pathlib.Path, mesh: jax.sharding.Mesh, *,
                 step: int | None = None) -> tuple[dict, int]:
    """(params, step): the weights of the run in `workdir` (its EMA when it kept one) in
    that run's own structure, replicated over `mesh`; `step` defaults to the latest.

    Raises FileNotFoundError when the workdir, its tokenizer or the checkpoint is missing.
    """
    _, loaded, step = _restore_params(read_run(workdir), mesh, step, fsdp=False)
    return (loaded["params"] if loaded["ema_params"] is None else loaded["ema_params"]), step


def with_energy(run: Run, energy_run: Run) -> Run:
    """`run` (a masked diffusion run) corrected by the energy of `energy_run`: an AR run
    (EDLM-AR) or an EDLM-NCE run. Its network is an EnergyDenoiser and its params
    {"denoiser", "energy"}. Raises ValueError for any other pair."""
    if run.network_kind != "denoiser":
        raise ValueError(f"{run.workdir} is not a masked diffusion run: the edlm sampler "
                         "corrects an MDLM denoiser")
    if energy_run.network_kind not in ("causal", "energy"):
        raise ValueError(f"the energy {energy_run.workdir} is neither an AR run nor an "
                         "EDLM-NCE run (configs/edlm.py)")
    if energy_run.tokenizer_state() != run.tokenizer_state():
        raise ValueError(f"the energy {energy_run.workdir} uses another tokenizer than "
                         f"{run.workdir}")
    energy = sampling.energy_from_flax(energy_run.module, energy_run.network_kind)
    return dataclasses.replace(
        run, network=sampling.EnergyDenoiser(run.network, energy),
        params={"denoiser": run.params, "energy": energy_run.params})


def with_drafter(run: Run, drafter_run: Run) -> Run:
    """`run` (an AR run, the target) with the masked diffusion network of `drafter_run`
    drafting for it (DiffuSpec, AR-guided unmasking): its network is a DraftedCausalLM and
    its params {"drafter", "target"}. Raises ValueError for any other pair or tokenizer."""
    if run.network_kind != "causal":
        raise ValueError(f"{run.workdir} is not an autoregressive run: a drafter drafts for "
                         "an AR target")
    if drafter_run.network_kind != "denoiser":
        raise ValueError(f"the drafter {drafter_run.workdir} is not a masked diffusion run")
    if drafter_run.tokenizer_state() != run.tokenizer_state():
        raise ValueError(f"the drafter {drafter_run.workdir} uses another tokenizer than "
                         f"{run.workdir}")
    return dataclasses.replace(
        run, network=sampling.DraftedCausalLM(drafter_run.network, run.network),
        params={"drafter": drafter_run.params, "target": run.params})


def batch_sharding(run: Run, batch_size: int):
    """Rows split over the run's `data` axis when it divides the batch, else replicated."""
    spec = P(DATA_AXIS) if batch_size % run.mesh.shape[DATA_AXIS] == 0 else P()
    return NamedSharding(run.mesh, spec)
