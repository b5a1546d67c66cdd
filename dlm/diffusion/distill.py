"""Self-distillation through time (SDTT, Deschenaux & Gulcehre): few-step masked diffusion.

A student (initialised from a trained MDLM run, `config.init_from`) learns to do in one
reverse step what its teacher (a frozen copy of that run, kept in the process state) does in
`distill_steps` = k ancestral steps of size dt:

1. x_t: the data corrupted at t ~ U[t_min, 1] (stratified over the global batch).
2. Without gradient, the teacher runs k MDLM ancestral steps t_j -> t_j - dt from x_t
   (t_j = t - j dt, clipped at 0), revealing each masked position with probability
   (m(t_j) - m(s_j)) / m(t_j) (m = 1 - alpha) and drawing its token from the teacher's
   p(x_0 | x_{t_j}). The target at a position revealed at step j is that step's teacher
   distribution; a position still masked after the k steps takes the last step's.
3. The student predicts p(x_0 | x_t) once; the loss is a divergence between the student's and
   the target distributions (over the vocabulary without the mask token), summed over the
   positions masked in x_t and averaged over their number: `reverse_kl` KL(student || teacher)
   (the default, SDTT's best), `forward_kl` KL(teacher || student), `mse` the mean squared
   difference of the log-probabilities, `tvd` the total variation distance.

Rounds: round r (train steps r N + 1 .. (r + 1) N, N = `round_steps`) uses dt = 2^r / S_0, where
S_0 = `teacher_steps` is the number of sampling steps of the first teacher; at its end the
teacher becomes the student (its EMA when `teacher_from_ema` and the run keeps one) and the
round counter advances. With k = 2 each round halves the sampling steps: the student of
round r targets S_0 / (k 2^r) steps (1024 -> 512 -> 256 ...). The trainer keeps the state at
the end of every round as a run of its own, WORKDIR/rounds/<steps>_steps (see
`round_checkpoint_name`).

The process state is {"teacher": params, "round": int32 scalar}, so a resumed run continues
with the same teacher and dt. Only the teacher changes at a round's end: the student keeps
training its own weights with the same optimizer state (SDTT's code can also restart the
student from its EMA and reset the optimizer; here the trainer owns both). The student is an
ordinary MDLM denoiser: `nll` is MDLM's NELBO and the samplers treat an SDTT run as a masked
diffusion run (`schedule`, `mask_id`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dlm.diffusion import masked, process, schedules

DIVERGENCES = ("reverse_kl", "forward_kl", "mse", "tvd")


def divergence(name: str, target_log_p_BLK: jax.Array, student_log_q_BLK: jax.Array
               ) -> jax.Array:
    """float32 [B, L]: the divergence `name` (one of DIVERGENCES) between the target p and the
    student q at each position, from finite log-probabilities over the same K classes."""
    log_p, log_q = target_log_p_BLK, student_log_q_BLK
    if name == "reverse_kl":
        return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    if name == "forward_kl":
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    if name == "mse":
        return jnp.mean(jnp.square(log_q - log_p), axis=-1)
    if name == "tvd":
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_q) - jnp.exp(log_p)), axis=-1)
    raise ValueError(f"process.divergence={name!r}; allowed values: {', '.join(DIVERGENCES)}")


def clean_log_probs(logits_BLV: jax.Array) -> jax.Array:
    """float32 [B, L, V - 1]: log p(x_0 | x_t) over the vocabulary without the mask token
    (always the last id), finite everywhere, so divergences and their gradients are too."""
    return jax.nn.log_softmax(logits_BLV[..., :-1].astype(jnp.float32), axis=-1)


@process.PROCESSES.register("sdtt")
@dataclasses.dataclass(frozen=True)
class SelfDistillation(process.Process):
    """SDTT, with a process state (teacher params, round).

    Attributes:
      base: the teacher's masked diffusion process (schedule, mask id, t_min; its NELBO is
        the student's `nll`).
      teacher_steps: S_0, the sampling steps of the first teacher (dt = 2^round / S_0).
      distill_steps: k, teacher steps the student matches with one.
      round_steps: N, train steps per round.
      divergence: one of DIVERGENCES.
      teacher_from_ema: the next round's teacher is the student's EMA (when kept).
    """

    base: masked.MaskedDiffusion
    teacher_steps: int = 1024
    distill_steps: int = 2
    round_steps: int = 10_000
    divergence: str = "reverse_kl"
    teacher_from_ema: bool = True

    models: ClassVar[tuple[str, ...]] = ("dit",)
    network_kind: ClassVar[str] = "denoiser"

    @classmethod
    def check_config(cls, config) -> None:
        """ValueError naming the key when the SDTT settings of `config` are unusable."""
        check_config(config)

    @classmethod
    def from_config(cls, config, vocab_size: int) -> SelfDistillation:
        """The SDTT process of `config` around MDLM's process of the same config."""
        check_config(config)
        p = config.process
        return SelfDistillation(
            base=masked.MaskedDiffusion.from_config(config, vocab_size),
            teacher_steps=int(p.teacher_steps), distill_steps=int(p.distill_steps),
            round_steps=int(p.round_steps), divergence=str(p.get("divergence", "reverse_kl")),
            teacher_from_ema=bool(p.get("teacher_from_ema", True)))

    @property
    def schedule(self) -> schedules.Schedule:
        return self.base.schedule

    @property
    def mask_id(self) -> int:
        return self.base.mask_id

    @property
    def t_min(self) -> float:
        return self.base.t_min

    def step_size(self, round_index: jax.Array) -> jax.Array:
        """float32 scalar dt of round `round_index`: 2^round / teacher_steps."""
        return jnp.exp2(jnp.asarray(round_index, jnp.float32)) / self.teacher_steps

    def student_steps(self, round_index: int) -> float:
        """Sampling steps the student of round `round_index` targets: S_0 / (k 2^round)."""
        return self.teacher_steps / (self.distill_steps * 2**round_index)

    # ---- process state ----------------------------------------------------------------------

    def frozen_networks(self) -> dict[str, str | None]:
        """The teacher: the run's own network (a DiT), first the init_from run's weights."""
        return {"teacher": None}

    def init_state(self, frozen_params) -> dict[str, Any]:
        """{"teacher": params, "round": 0}; the teacher starts as the init_from run's
        weights (`frozen_params["teacher"]`)."""
        return {"teacher": frozen_params["teacher"], "round": jnp.zeros((), jnp.int32)}

    def next_state(self, state, params, ema_params, step: jax.Array) -> dict[str, Any]:
        """After train step `step` (updates done): at a round's end (step a multiple of
        round_steps) the teacher becomes the student (or its EMA) and the round advances."""
        source = ema_params if (self.teacher_from_ema and ema_params is not None) else params
        ends = (step > 0) & (step % self.round_steps == 0)
        teacher = jax.tree.map(lambda new, old: jnp.where(ends, new.astype(old.dtype), old),
                               source, state["teacher"])
        return {"teacher": teacher, "round": state["round"] + ends.astype(jnp.int32)}

    def round_checkpoint_name(self, step: int) -> str | None:
        """On the host: '<steps>_steps' when train step `step` ends a round (the sampling
        steps its student targets), else None."""
        if step <= 0 or step % self.round_steps:
            return None
        return f"{self.student_steps(step // self.round_steps - 1):g}_steps"

    # ---- loss -------------------------------------------------------------------------------

    def teacher_targets(self, teacher_fn: process.ModelFn, xt_BL: jax.Array, t_B: jax.Array,
                        dt: jax.Array, rng: jax.Array, example_id_B: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
        """The teacher's k ancestral steps of size dt from (x_t, t).

        Returns (target_log_probs_BLK float32 [B, L, V - 1], reveal_step_BL int32 [B, L]):
        for a position masked in x_t, the teacher's log p(x_0 | .) at the step j that
        revealed it (reveal_step j), or at the last step when none did (reveal_step k); at
        positions not masked in x_t the targets are the first step's and reveal_step is -1.
        """
        k = self.distill_steps
        length = xt_BL.shape[1]
        x_BL = xt_BL
        target_BLK = None
        reveal_step_BL = jnp.where(xt_BL == self.mask_id, k, -1).astype(jnp.int32)
        for j in range(k):
            t_j_B = jnp.maximum(t_B - j * dt, 0.0)
            s_j_B = jnp.maximum(t_B - (j + 1) * dt, 0.0)
            log_p_BLK = clean_log_probs(teacher_fn(x_BL, t_j_B))
            is_masked_BL = x_BL == self.mask_id
            if target_BLK is None:
                target_BLK = log_p_BLK
            if j == k - 1:  # revealed now or never: this step's prediction
                target_BLK = jnp.where(is_masked_BL[..., None], log_p_BLK, target_BLK)
                break
            m_t_B, m_s_B = self.schedule.mask_prob(t_j_B), self.schedule.mask_prob(s_j_B)
            reveal_prob_B = jnp.where(m_t_B > 0, (m_t_B - m_s_B) / jnp.maximum(m_t_B, 1e-30),
                                      1.0)
            keys_B = process.example_keys(jax.random.fold_in(rng, j), example_id_B)
            u_BL, draw_BL = jax.vmap(
                lambda key, log_p_LK: _uniform_and_draw(key, log_p_LK, length))(keys_B,
                                                                                log_p_BLK)
            revealed_BL = is_masked_BL & (u_BL < reveal_prob_B[:, None])
            target_BLK = jnp.where(revealed_BL[..., None], log_p_BLK, target_BLK)
            reveal_step_BL = jnp.where(revealed_BL, j, reveal_step_BL)
            x_BL = jnp.where(revealed_BL, draw_BL, x_BL)
        return target_BLK, reveal_step_BL

    def token_losses(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array,
                     num_examples: int, state, teacher_fn: process.ModelFn
                     ) -> tuple[jax.Array, jax.Array]:
        """(loss_BL, counted_BL), float32 [B, L]: the divergence at each real position masked
        in x_t (0 elsewhere) and the indicator of those positions; `teacher_fn` is the
        frozen teacher (the state's params, bound by the caller)."""
        example_id_B = batch["example_id"]
        time_rng, mask_rng, teacher_rng = jax.random.split(rng, 3)
        # Continuous times even when the teacher's NELBO uses T steps: dt sets the grid.
        t_B = schedules.sample_times(time_rng, example_id_B, num_examples, self.t_min)
        xt_BL = self.base.corrupt(batch["tokens"], t_B, mask_rng, example_id_B)
        target_BLK, _ = self.teacher_targets(teacher_fn, xt_BL, t_B,
                                             self.step_size(state["round"]), teacher_rng,
                                             example_id_B)
        target_BLK = jax.lax.stop_gradient(target_BLK)
        student_BLK = clean_log_probs(model_fn(xt_BL, t_B))
        counted_BL = (xt_BL == self.mask_id) & (batch["loss_mask"] > 0)
        loss_BL = divergence(self.divergence, target_BLK, student_BLK)
        return jnp.where(counted_BL, loss_BL, 0.0), counted_BL.astype(jnp.float32)

    def loss(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *,
             num_examples: int, state=None, frozen=None) -> tuple[jax.Array, process.Metrics]:
        """See `process.Process.loss`: the mean divergence over the real positions masked in
        x_t (`token_count` counts them), against `frozen["teacher"]`."""
        if state is None or not frozen:
            raise ValueError("the SDTT loss needs the process state (teacher params, round) "
                             "and the teacher bound in `frozen`")
        loss_BL, counted_BL = self.token_losses(model_fn, batch, rng, num_examples, state,
                                                frozen["teacher"])
        loss_sum, token_count = jnp.sum(loss_BL), jnp.sum(counted_BL)
        loss = loss_sum / jnp.maximum(token_count, 1.0)
        return loss, {"loss_sum": loss_sum, "token_count": token_count}

    def nll(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *,
            num_examples: int, state=None, frozen=None) -> tuple[jax.Array, jax.Array]:
        """The student's MDLM NELBO (the teacher plays no part), see
        `masked.MaskedDiffusion.nll`."""
        del state, frozen
        return self.base.nll(model_fn, batch, rng, num_examples=num_examples)


def _uniform_and_draw(key: jax.Array, log_p_LK: jax.Array, length: int
                      ) -> tuple[jax.Array, jax.Array]:
    """For one example: L uniforms and one token id per position drawn from exp(log_p_LK)."""
    u_key, draw_key = jax.random.split(key)
    u_L = jax.random.uniform(u_key, (length,), jnp.float32)
    return u_L, jax.random.categorical(draw_key, log_p_LK, axis=-1).astype(jnp.int32)


def check_config(config) -> None:
    """ValueError naming the key when the SDTT settings of `config` are unusable."""
    p = config.process
    if not config.get("init_from", ""):
        raise ValueError("config.init_from is empty; process.name='sdtt' distils a trained "
                         "MDLM run: set --config.init_from=WORKDIR")
    name = p.get("divergence", "reverse_kl")
    if name not in DIVERGENCES:
        raise ValueError(f"config.process.divergence={name!r} is not one of {list(DIVERGENCES)}")
    for key in ("teacher_steps", "distill_steps", "round_steps"):
        value = p.get(key, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.process.{key}={value!r} must be a positive integer")
    if p.distill_steps < 2:
        raise ValueError(f"config.process.distill_steps={p.distill_steps} must be >= 2 (the "
                         "student matches that many teacher steps with one)")
    rounds = math.ceil(config.total_steps / p.round_steps)
    last = p.teacher_steps / (p.distill_steps * 2 ** (rounds - 1))
    if last < 1:
        raise ValueError(
            f"config.total_steps={config.total_steps} makes {rounds} rounds of "
            f"process.round_steps={p.round_steps}: the last student would target {last:g} "
            f"sampling steps (process.teacher_steps={p.teacher_steps}, "
            f"distill_steps={p.distill_steps}); use fewer rounds or more teacher steps")
