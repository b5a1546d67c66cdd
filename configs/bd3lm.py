"""Block diffusion (BD3-LM): `--config=configs/bd3lm.py:SIZE`, SIZE in micro|tiny|small|medium.

The same DiT as MDLM, trained on x_t ⊕ x_0 with the two-stream mask; `--config.block_size`
sets b (it must divide data.seq_len; b = seq_len is MDLM's loss, b = 1 an AR model's).
Training times are drawn from the clip interval [process.clip_min, process.clip_max], which
the search at each evaluation replaces by the candidate (widths `process.clip_search_widths`,
lower ends every `process.clip_search_step`) with the lowest variance of the per-block NELBO on
`process.search_batches` validation batches; an empty widths list keeps the interval fixed.
Fine-tune from an MDLM run with `--config.init_from=DIR`.
"""

from configs import common


def get_config(arg: str | None = None):
    size = arg or "micro"
    config = common.base_config("bd3lm", "dit", size)
    config.block_size = 4
    config.process.update(dict(
        clip_min=0.0,
        clip_max=1.0,
        clip_search_widths=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0),  # a tuple: overridable as "()"
        clip_search_step=0.1,
        search_batches=4,
    ))
    return common.apply_variant(config, size)
