"""Small configs shared by the training tests."""

import ml_collections

from configs import mdlm


def small_config(data_dir, method=mdlm, **overrides) -> ml_collections.ConfigDict:
    config = method.get_config("micro")
    config.model.update(hidden=32, layers=2, heads=2, kv_heads=2, cond_dim=32, dropout=0.0)
    config.data.update(data_dir=str(data_dir), seq_len=32, batch_size=16, eval_batch_size=8)
    config.update(total_steps=6, log_every=1, eval_every=1000, checkpoint_every=3)
    config.optimizer.update(warmup_steps=2, learning_rate=3e-3)
    config.eval.num_batches = 2
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config
