"""Self-distillation through time (SDTT): `--config=configs/sdtt.py:SIZE --config.init_from=DIR`.

DIR is a trained MDLM run of the same SIZE (and `data.seq_len`): its weights start both the
student and the first teacher. Round r (`process.round_steps` train steps) teaches the student
to do `process.distill_steps` teacher steps of size dt = 2^r / `process.teacher_steps` in one;
at each round's end the teacher becomes the student (its EMA with `process.teacher_from_ema`)
and WORKDIR/rounds/<steps>_steps keeps the student, which `experiments.sample --workdir=...
--sampler=mdlm --steps=<steps>` samples. `process.divergence`: reverse_kl | forward_kl | mse |
tvd. `micro` distils a 64-step teacher in 3 rounds of 100 steps (students for 32, 16 and 8 steps)
on CPU; the larger sizes follow SDTT (1024 steps, 7 rounds of 10k steps).
"""

from configs import common


def get_config(arg: str | None = None):
    size = arg or "micro"
    config = common.base_config("sdtt", "dit", size)
    config.process.update(dict(
        teacher_steps=1024,  # sampling steps of the first teacher (dt = 1 / teacher_steps)
        distill_steps=2,  # teacher steps per student step
        round_steps=10_000,  # train steps per round
        divergence="reverse_kl",
        teacher_from_ema=True,
    ))
    config.total_steps = 7 * 10_000  # students for 512, 256, ..., 8 steps
    config.optimizer.update(learning_rate=6e-5, warmup_steps=500)
    config = common.apply_variant(config, size)
    if size == "micro":
        config.data.seq_len = 128  # as the micro MDLM runs of the README and benchmarks
        config.process.update(teacher_steps=64, round_steps=100)
        config.total_steps = 3 * 100
        config.eval_every = 100
        config.checkpoint_every = 50
        config.optimizer.update(learning_rate=3e-4, warmup_steps=20)
    return config
