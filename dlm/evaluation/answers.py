"""Task accuracy: answer held-out prompts with any sampler and check the answers.

Every row of a batch is laid out as in training (`dlm.data.sft`): ``BOS prompt SEP`` known at
positions 0..P_b - 1 (P_b differs from row to row), then the answer budget of
``max_new_tokens`` open positions, then, up to the common length L, the run's fill (EOS, or
PAD for a run trained with the pad fill) as known context. Rows of different prompt lengths
thus share one batch without left padding, each sees the positions it was trained at, and
every batch has the same shape (the last one is topped up with copies of its final example,
which are dropped), so the sampler compiles once. A sampler with `stop_at_eos` ends a row at
its first generated EOS.

The response is the generated text after SEP up to its first EOS; the task's verifier
(`dlm.data.tasks`) extracts the answer and checks it. Speed counts the answer tokens (the
response and its EOS) and every decoded position (`positions_per_call`: what a step
commits, the EOS fill included) per network call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np

from dlm.data import sft
from dlm.data.tasks import Example, Task
from dlm.sampling import engine


@dataclasses.dataclass(frozen=True)
class Layout:
    """How prompts become sampler inputs: the length L, the answer budget and the fill."""

    length: int
    max_new_tokens: int
    fill_id: int
    mask_id: int

    def rows(self, prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_BL int32, known_BL bool) for encoded prompts (BOS prompt SEP each)."""
        tokens_BL = np.full((len(prompts), self.length), self.fill_id, np.int32)
        known_BL = np.ones((len(prompts), self.length), bool)
        for row, prompt in enumerate(prompts):
            end = min(len(prompt) + self.max_new_tokens, self.length)
            tokens_BL[row, :len(prompt)] = prompt
            tokens_BL[row, len(prompt):end] = self.mask_id
            known_BL[row, len(prompt):end] = False
        return tokens_BL, known_BL


def encode_prompts(examples: Sequence[Example], tokenizer, length: int, *,
                   chat: bool = False) -> list[np.ndarray]:
    """BOS prompt SEP of each example (with `chat`, the prompt in the tokenizer's chat
    template, `sft.chat_prompt`); ValueError naming the first that leaves no room."""
    if chat:
        prompts = [sft.chat_prompt(tokenizer, e.prompt) for e in examples]
    else:
        specials = sft.Specials.of(tokenizer)
        prompts = [sft.encode_prompt(ids, specials)
                   for ids in tokenizer.encode_batch([e.prompt for e in examples])]
    for index, prompt in enumerate(prompts):
        if len(prompt) >= length:
            raise ValueError(f"example {index}: its prompt is {len(prompt)} tokens (encoded), "
                             f"which leaves no room to answer within length={length}")
    return prompts


def answer(sampler, network, params, task: Task, examples: Sequence[Example], tokenizer, *,
           layout: Layout, batch_size: int, seed: int = 0, sharding=None,
           fetch=jax.device_get, chat: bool = False) -> tuple[list[dict], dict]:
    """Answers `examples` with `sampler` and scores them (`chat`: prompts in the chat
    template). Returns (one row per example, the summary: accuracy and its standard error,
    NFE, tokens per call, speed)."""
    if not examples:
        raise ValueError("no examples to answer")
    prompts = encode_prompts(examples, tokenizer, layout.length, chat=chat)
    rng = jax.random.PRNGKey(seed)
    rows, seconds, compile_seconds = [], 0.0, 0.0
    for index, start in enumerate(range(0, len(examples), batch_size)):
        chunk = list(range(start, min(start + batch_size, len(examples))))
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        tokens_BL, known_BL = layout.rows([prompts[i] for i in padded])
        drawn = engine.draw(sampler, network, params, jax.random.fold_in(rng, index),
                            tokens_BL=tokens_BL, known_BL=known_BL, sharding=sharding,
                            fetch=fetch)
        seconds += sum(drawn.seconds)
        compile_seconds += drawn.compile_seconds
        out = drawn.output
        for row, i in enumerate(chunk):
            rows.append(_row(task, examples[i], tokenizer, out.tokens_BL[row], known_BL[row],
                             len(prompts[i]), int(out.nfe_B[row]),
                             sum(drawn.seconds) / batch_size, int(out.token_forwards_B[row]),
                             int(out.remasked_B[row])))
    return rows, summarize(rows, sampler.name, seconds, compile_seconds)


def _row(task: Task, example: Example, tokenizer, tokens_L, known_L, prompt_len: int,
         nfe: int, seconds: float, token_forwards: int, remasked: int = 0) -> dict:
    response = sft.response_ids(tokens_L, prompt_len, tokenizer.eos_id)
    text = tokenizer.decode(response, skip_special=True)
    answer_tokens = min(len(response) + 1, int(np.sum(~known_L)))  # with its EOS
    return {
        "prompt": example.prompt,
        "target": example.answer,
        "response": text,
        "response_ids": [int(i) for i in response],
        "extracted": task.extract(text),
        "correct": bool(task.is_correct(example, text)),
        "nfe": nfe,
        "token_forwards": token_forwards,
        "remasked": remasked,
        "answer_tokens": answer_tokens,
        "decoded_positions": int(np.sum(~known_L)),
        "seconds": seconds,
    }


def summarize(rows: Sequence[dict], sampler_name: str, seconds: float,
              compile_seconds: float) -> dict:
    """Accuracy with its standard error (binomial, sqrt(p (1 - p) / n)), mean NFE, answer
    tokens and decoded positions per network call, the query positions the network processed
    per answer token (`token_forwards_per_token`: L per plain call, fewer with a KV cache),
    committed tokens re-masked per answer (`mean_remasked`, remasking samplers), answer
    tokens per second."""
    n = len(rows)
    accuracy = float(np.mean([r["correct"] for r in rows]))
    nfe = np.asarray([r["nfe"] for r in rows], np.float64)
    calls = max(float(nfe.sum()), 1.0)
    answer_tokens = float(sum(r["answer_tokens"] for r in rows))
    return {
        "sampler": sampler_name,
        "num_examples": n,
        "accuracy": accuracy,
        "accuracy_stderr": math.sqrt(accuracy * (1.0 - accuracy) / n),
        "mean_nfe": float(nfe.mean()),
        "tokens_per_call": answer_tokens / calls,
        "token_forwards_per_token": float(sum(r.get("token_forwards", 0) for r in rows))
        / max(answer_tokens, 1.0),
        "positions_per_call": float(sum(r["decoded_positions"] for r in rows)) / calls,
        "mean_answer_tokens": answer_tokens / n,
        "mean_remasked": float(np.mean([r.get("remasked", 0) for r in rows])),
        "tokens_per_second": answer_tokens / seconds if seconds > 0 else float("nan"),
        "seconds": seconds,
        "compile_seconds": compile_seconds,
    }
