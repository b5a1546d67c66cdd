"""What an lm-evaluation-harness model needs from a run trained on prompt/response data:
`loglikelihood`, `loglikelihood_rolling` and `generate_until` (the adapter itself, which
imports `lm_eval`, is `experiments.lm_eval_harness`; this module needs no `lm_eval`).

Every request is laid out as in SFT (`dlm.data.sft`): ``BOS context SEP continuation``,
then padding that no query attends to (`valid` = 0), so a row is scored as if the sequence
ended with the continuation; rows of different lengths share one batch.

- `loglikelihood(context, continuation)`: minus the process's NLL of the continuation
  tokens given the context (`Process.nll` with the context as the never-masked prompt):
  exact for AR; for masked and block diffusion the negated NELBO, a lower bound on the
  log-likelihood, averaged over `nll_draws` Monte-Carlo draws (LLaDA evaluates its
  likelihood tasks the same way, with its own estimator). `is_greedy` is whether the
  sampler, given the context and a budget of exactly the continuation's length, generates
  it.
- `loglikelihood_rolling(text)`: the text as the response to an empty prompt, scored in
  consecutive pieces, each conditioned on as much of the text before it as fits (the chain
  rule, exact for AR when the text fits the room).
- `generate_until(context, {until, max_gen_toks})`: the sampler's answer (through
  `answering.answer_run`, greedy or not as the sampler is), cut at the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlm.data import sft, tasks
from dlm.parallel import model_fn
from dlm.runs import answering


class Scorer:
    """Requests answered by one loaded run (`dlm.runs.load_run`) and one sampler.

    Args:
      run: a loaded run trained on prompt/response data.
      sampler: the sampler of `generate_until` and `is_greedy`.
      batch_size: requests per network batch.
      nll_draws: Monte-Carlo draws per likelihood (1 is exact for AR).
      length: positions per row (default: the run's training length).
      seed: the key of every draw.
    """

    def __init__(self, run, sampler, *, batch_size: int = 16, nll_draws: int = 8,
                 length: int | None = None, seed: int = 0):
        if not run.process.conditional:
            raise ValueError(f"{run.workdir} was trained by {type(run.process).__name__}, "
                             "which takes no prompts; the harness adapter needs a run trained "
                             "on prompt/response data")
        for name, value in (("batch_size", batch_size), ("nll_draws", nll_draws)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.run, self.sampler = run, sampler
        self.batch_size, self.nll_draws, self.seed = batch_size, nll_draws, seed
        self.length = int(length or run.config.data.seq_len)
        self.specials = sft.Specials.of(run.tokenizer)
        self._verifier = tasks.make_task("exact_match")
        process, module = run.process, run.module

        def nll(params, batch, rng):
            fn = model_fn(module, params, train=False)
            return process.nll(fn, batch, rng, num_examples=batch["tokens"].shape[0])[0]

        self._nll = jax.jit(nll)

    # ------------------------------------------------------------------ encoding

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.run.tokenizer.encode(text), np.int32)

    def _rows(self, prompts: Sequence[np.ndarray], continuations: Sequence[np.ndarray]
              ) -> dict[str, np.ndarray]:
        """The batch of ``BOS prompt SEP continuation`` rows (prompts already encoded)."""
        n, length = len(prompts), self.length
        tokens = np.full((n, length), self.specials.pad, np.int32)
        prompt_mask = np.zeros((n, length), np.float32)
        loss_mask = np.zeros((n, length), np.float32)
        valid = np.zeros((n, length), np.float32)
        for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            end = len(prompt) + len(continuation)
            if end > length:
                raise ValueError(f"request {row}: {len(prompt)} prompt tokens (with BOS and "
                                 f"SEP) and {len(continuation)} continuation tokens exceed "
                                 f"length={length}")
            tokens[row, :len(prompt)] = prompt
            tokens[row, len(prompt):end] = continuation
            prompt_mask[row, :len(prompt)] = 1.0
            loss_mask[row, len(prompt):end] = 1.0
            valid[row, :end] = 1.0
        return {"tokens": tokens, "prompt_mask": prompt_mask, "loss_mask": loss_mask,
                "valid": valid, "example_id": np.arange(n, dtype=np.int32)}

    def _batches(self, count: int):
        for start in range(0, count, self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, count)))
            # Topped up with copies of the last request, so every batch has one shape.
            yield chunk, chunk + [chunk[-1]] * (self.batch_size - len(chunk))

    # ------------------------------------------------------------------ requests

    def log_likelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """log p(continuation | context) per pair (a NELBO lower bound for diffusion)."""
        return self._log_likelihoods(
            [sft.encode_prompt(self._ids(c), self.specials) for c, _ in pairs],
            [self._ids(x) for _, x in pairs])

    def _log_likelihoods(self, prompts: Sequence[np.ndarray],
                         continuations: Sequence[np.ndarray]) -> list[float]:
        """log p(continuation | prompt) per row; prompts are encoded (never masked)."""
        out = np.zeros(len(prompts), np.float64)
        key = jax.random.PRNGKey(self.seed)
        for index, (chunk, padded) in enumerate(self._batches(len(prompts))):
            batch = {k: jnp.asarray(v) for k, v in self._rows(
                [prompts[i] for i in padded], [continuations[i] for i in padded]).items()}
            total = np.zeros(self.batch_size, np.float64)
            for draw in range(self.nll_draws):
                rng = jax.random.fold_in(jax.random.fold_in(key, index), draw)
                total += np.asarray(jax.device_get(self._nll(self.run.params, batch, rng)),
                                    np.float64)
            out[chunk] = -total[:len(chunk)] / self.nll_draws
        return out.tolist()

    def generate(self, contexts: Sequence[str], max_new_tokens: int) -> list[np.ndarray]:
        """The sampler's response ids (up to the first EOS) per context, `max_new_tokens`
        open positions after each."""
        examples = [tasks.Example(prompt=c, response="") for c in contexts]
        rows, _ = answering.answer_run(self.run, self.sampler, self._verifier, examples,
                                       batch_size=self.batch_size, length=self.length,
                                       max_new_tokens=max_new_tokens, seed=self.seed)
        return [np.asarray(r["response_ids"], np.int32) for r in rows]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) per (context, continuation)."""
        values = self.log_likelihoods(pairs)
        greedy = [False] * len(pairs)
        by_length: dict[int, list[int]] = {}
        for i, (_, continuation) in enumerate(pairs):
            by_length.setdefault(len(self._ids(continuation)), []).append(i)
        for size, members in by_length.items():
            if size == 0:
                continue
            generated = self.generate([pairs[i][0] for i in members], size)
            for i, ids in zip(members, generated):
                greedy[i] = np.array_equal(ids, self._ids(pairs[i][1]))
        return list(zip(values, greedy))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p(text) per text, the text as the response to an empty prompt: consecutive
        pieces of at most half the room, each given as much of the text before it as fits
        (as clean response tokens)."""
        room = self.length - 2  # BOS and SEP
        piece = max(room // 2, 1)
        start_ids = sft.encode_prompt(np.zeros(0, np.int32), self.specials)  # BOS SEP
        prompts, pieces, owner = [], [], []
        for t, text in enumerate(texts):
            ids = self._ids(text)
            for start in range(0, len(ids), piece):
                stop = min(start + piece, len(ids))
                # The text before the piece continues the response (after SEP), clean.
                prompts.append(np.concatenate([start_ids, ids[max(0, stop - room):start]]))
                pieces.append(ids[start:stop])
                owner.append(t)
        totals = np.zeros(len(texts), np.float64)
        if pieces:
            for t, value in zip(owner, self._log_likelihoods(prompts, pieces)):
                totals[t] += value
        return totals.tolist()

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """The answer text per (context, gen_kwargs), cut at the first `until` string;
        `max_gen_toks` (default: all the room after the context) bounds it."""
        out = [""] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, (context, kwargs) in enumerate(requests):
            room = self.length - len(self._ids(context)) - 2
            budget = min(int((kwargs or {}).get("max_gen_toks", room)), room)
            if budget < 1:
                raise ValueError(f"request {i}: its context leaves no room to answer within "
                                 f"length={self.length}")
            groups.setdefault(budget, []).append(i)
        for budget, members in groups.items():
            generated = self.generate([requests[i][0] for i in members], budget)
            for i, ids in zip(members, generated):
                text = self.run.tokenizer.decode(ids, skip_special=True)
                until = (requests[i][1] or {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[i] = text
        return out
