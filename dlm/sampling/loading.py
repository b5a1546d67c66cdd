"""Loading a trained run for sampling: its network, tokenizer and checkpointed weights.

Only the workdir is read (config, tokenizer, checkpoints); the training data is not needed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dlm.data import tokenizers
from dlm.diffusion import process as process_lib
from dlm.models import configs as model_configs
from dlm.sampling import networks
from dlm.training import checkpoint as checkpoint_lib
from dlm.training import experiment
from dlm.training import mesh as mesh_lib
from dlm.training import optimizer as optimizer_lib
from dlm.training.step import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What a run's workdir says without loading weights: its config and tokenizer."""

    workdir: pathlib.Path
    config: Any  # ml_collections.ConfigDict
    tokenizer: tokenizers.Tokenizer

    @property
    def is_autoregressive(self) -> bool:
        return self.config.process.name == "ar"

    @property
    def is_block(self) -> bool:
        """Whether it is a block diffusion (BD3-LM) run, sampled by the block samplers."""
        return self.config.process.name == "bd3lm"

    @property
    def block_size(self) -> int | None:
        """The block size of a block diffusion run (None otherwise)."""
        if not self.is_block:
            return None
        size = self.config.get("block_size", None) or self.config.process.get("block_size", None)
        return None if size is None else int(size)

    @property
    def is_energy(self) -> bool:
        """Whether it is an EDLM-NCE energy run (an energy for `edlm`, not a sampler)."""
        return self.config.process.name == "edlm_nce"

    def tokenizer_state(self) -> dict:
        """The saved tokenizer file's content, for comparing two runs' tokenizers."""
        path = self.workdir / experiment.TOKENIZER_DIR / tokenizers.TOKENIZER_FILE
        return json.loads(path.read_text(encoding="utf-8"))


@dataclasses.dataclass(frozen=True)
class Run(RunFiles):
    """A trained run, ready to sample from."""

    module: Any = None  # flax.linen.Module
    process: Any = None
    network: networks.Denoiser | networks.BlockDenoiser | networks.CausalLM | None = None
    params: Any = None  # laid out on `mesh` as in training (replicated or FSDP)
    mesh: Any = None  # jax.sharding.Mesh
    step: int = -1


def read_run(workdir) -> RunFiles:
    """The config and tokenizer of the run in `workdir` (FileNotFoundError if missing)."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    config = experiment.load_config(workdir)
    tokenizer = tokenizers.load_tokenizer(workdir / experiment.TOKENIZER_DIR)
    config.model.vocab_size = tokenizer.vocab_size
    return RunFiles(workdir, config, tokenizer)


def load_run(workdir_or_files, step: int | None = None, use_ema: bool | None = None) -> Run:
    """The run (a workdir or its `read_run`) at checkpoint `step` (default: latest), with its
    EMA weights when it has them and `use_ema` (default: the run's `eval.use_ema`) allows.

    Raises FileNotFoundError when the workdir, its tokenizer or the checkpoint is missing.
    """
    files = workdir_or_files
    if not isinstance(files, RunFiles):
        files = read_run(files)
    config, vocab_size = files.config, files.tokenizer.vocab_size
    module = model_configs.build_model(config.model, vocab_size)
    process = process_lib.make_process(config, vocab_size=vocab_size)
    # The optimizer state is part of the checkpoint, so it shapes the restore target.
    mesh = mesh_lib.make_mesh()
    skeleton = experiment.Experiment(
        config=config, corpus=None, model=module, process=process, mesh=mesh,
        tx=optimizer_lib.make_optimizer(config.optimizer, config.total_steps))
    state, step = checkpoint_lib.restore_from_workdir(
        files.workdir, checkpoint_lib.abstract_like(skeleton.init_state()), step=step)
    use_ema = config.eval.get("use_ema", True) if use_ema is None else use_ema
    return Run(files.workdir, config, files.tokenizer, module=module, process=process,
               network=networks.from_flax(module, process, files.tokenizer,
                                          context_len=int(config.data.seq_len)),
               params=state.eval_params(use_ema), mesh=mesh, step=int(step))


def with_energy(run: Run, energy_run: Run) -> Run:
    """`run` (a masked diffusion run) corrected by the energy of `energy_run`: an AR run
    (EDLM-AR) or an EDLM-NCE run. Its network is an EnergyDenoiser and its params
    {"denoiser", "energy"}. Raises ValueError for any other pair."""
    from dlm.diffusion import energy as energy_lib

    if run.is_autoregressive or run.is_block or run.is_energy:
        raise ValueError(f"{run.workdir} is not a masked diffusion run: the edlm sampler "
                         "corrects an MDLM denoiser")
    if energy_run.is_autoregressive:
        energy = energy_lib.ARResidualEnergy(energy_run.module)
    elif energy_run.is_energy:
        energy = energy_lib.LearnedEnergy(energy_run.module)
    else:
        raise ValueError(f"the energy {energy_run.workdir} is neither an AR run nor an "
                         "EDLM-NCE run (configs/edlm.py)")
    if energy_run.tokenizer_state() != run.tokenizer_state():
        raise ValueError(f"the energy {energy_run.workdir} uses another tokenizer than "
                         f"{run.workdir}")
    return dataclasses.replace(
        run, network=networks.EnergyDenoiser(run.network, energy),
        params={"denoiser": run.params, "energy": energy_run.params})


def batch_sharding(run: Run, batch_size: int):
    """Rows split over the run's devices when they divide the batch, else replicated."""
    spec = P(DATA_AXIS) if batch_size % run.mesh.size == 0 else P()
    return NamedSharding(run.mesh, spec)
