"""Energy-based diffusion, EDLM-NCE: `--config=configs/edlm.py:SIZE --config.init_from=MDLM_DIR`.

Trains an energy network E(x_0, x_t, t) (`dlm.models.energy_net.EnergyNet`: the DiT of SIZE with
a fused x_t/x_0 input and a pooled scalar head) by noise-contrastive estimation against the
frozen MDLM denoiser of `init_from`, which also initialises every shared weight; SIZE must be
the MDLM run's. `process.nll_negatives` draws estimate log Z in the reported NLL. EDLM-AR
needs no training: sample with `--sampler=edlm --energy_workdir=AR_DIR`.
"""

from configs import common


def get_config(arg: str | None = None):
    size = arg or "micro"
    config = common.base_config("edlm_nce", "energy", size)
    config.process.nll_negatives = 1  # the paper's single-draw estimate of log Z
    config = common.apply_variant(config, size)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, 100)
    return config
