"""Prompt/response examples as fixed-length sequences, for supervised fine-tuning.

Layout of one example (``seq_len`` L):

    BOS prompt SEP response EOS fill...

``fill`` (``data.fill``):
  'eos': LLaDA's convention. The fill is EOS tokens that are trained on like the response, so
    the model decides its own answer length (every position after the answer is EOS).
  'pad': PAD tokens that carry no loss and that no query attends to (``valid`` = 0).

Fields (see `dlm.diffusion.process`): ``tokens`` int32 [L]; ``prompt_mask`` float32 [L], 1 on
BOS prompt SEP (never corrupted, never scored); ``loss_mask`` 1 on the response, its EOS and,
with the 'eos' fill, the fill; ``valid`` 1 everywhere but on 'pad' fill.

SEP is the tokenizer's `sep_id` (its BOS where it has no separator of its own: a BOS after
position 0 can only be the separator). A pretrained model's tokenizer has none (None): its
prompts are ``BOS prompt`` and the response follows directly, as the model was trained.
An example longer than L is handled by ``data.too_long``: 'error' (default; the message
gives the count and the longest) or 'drop' (the count is logged and kept in `dropped`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

FILLS = ("eos", "pad")
TOO_LONG = ("error", "drop")
# The `data.name`s of the prompt/response builders (`dlm.data.conditional`).
CONDITIONAL_DATA = ("jsonl", "gsm8k", "task")


def pad_unattended(data_config) -> bool:
    """Whether a network trained on `data_config` never attended to PAD: prompt/response
    data laid out with the pad fill."""
    return data_config.get("name") in CONDITIONAL_DATA and data_config.get("fill", "eos") == "pad"


@dataclasses.dataclass(frozen=True)
class Specials:
    bos: int
    sep: int | None
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> Specials:
        return cls(bos=tokenizer.bos_id, sep=tokenizer.sep_id, eos=tokenizer.eos_id,
                   pad=tokenizer.pad_id)


def encode_prompt(prompt_ids: np.ndarray, specials: Specials) -> np.ndarray:
    """int32 [P + 2]: BOS prompt SEP, what a sampler conditions on ([P + 1] without a SEP)."""
    sep = [] if specials.sep is None else [specials.sep]
    return np.concatenate([[specials.bos], prompt_ids, sep]).astype(np.int32)


def chat_prompt(tokenizer, text: str) -> np.ndarray:
    """int32 [P]: `text` as one user turn in the tokenizer's chat template (a pretrained
    instruct model's, `tokenizers.PretrainedTokenizer.chat_template`), ending where the
    assistant's answer starts, encoded as the model was trained (no BOS/SEP added: the
    template holds its own). Rendered by Jinja in a sandbox, as transformers renders it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("--chat needs a chat template: the tokenizer has none (a pretrained "
                         "instruct model's tokenizer_config.json holds it)")
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def special(token_id: int) -> str:
        return tokenizer.decode([token_id])

    rendered = env.from_string(template).render(
        messages=[{"role": "user", "content": text}], add_generation_prompt=True,
        bos_token=special(tokenizer.bos_id), eos_token=special(tokenizer.eos_id))
    return tokenizer.encode(rendered).astype(np.int32)


def response_ids(tokens: np.ndarray, prompt_len: int, eos: int) -> np.ndarray:
    """The generated response of a sequence whose first `prompt_len` tokens are the encoded
    prompt: the tokens after it, up to (without) the first EOS."""
    after = np.asarray(tokens[prompt_len:])
    ends = np.flatnonzero(after == eos)
    return after[: ends[0]] if len(ends) else after


class PromptResponseSequences:
    """Random-access fixed-length sequences of tokenized prompt/response pairs (see module).

    Args:
      prompts, responses: one int array of ids per example (no specials).
      seq_len: L.
      specials: BOS, SEP, EOS and PAD ids.
      fill: 'eos' or 'pad'.
      too_long: 'error' or 'drop'.
      what: names the data in messages (e.g. "split 'train' of addition").
    """

    def __init__(self, prompts, responses, seq_len: int, specials: Specials, *,
                 fill: str = "eos", too_long: str = "error", what: str = "the data"):
        if fill not in FILLS:
            raise ValueError(f"data.fill={fill!r}; allowed: {', '.join(FILLS)}")
        if too_long not in TOO_LONG:
            raise ValueError(f"data.too_long={too_long!r}; allowed: {', '.join(TOO_LONG)}")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        extra = 2 + (specials.sep is not None)  # BOS, (SEP,) EOS
        lengths = np.asarray([len(p) + len(r) + extra for p, r in zip(prompts, responses)],
                             np.int64)
        over = np.flatnonzero(lengths > seq_len)
        if len(over) and too_long == "error":
            raise ValueError(
                f"{len(over)} of {len(lengths)} examples of {what} are longer than "
                f"data.seq_len={seq_len} (the longest: {int(lengths.max())} tokens as BOS prompt "
                "SEP response EOS); raise data.seq_len or set data.too_long='drop'")
        keep = np.flatnonzero(lengths <= seq_len)
        if len(over):
            logging.warning("dropped %d of %d examples of %s longer than data.seq_len=%d "
                            "(data.too_long='drop')", len(over), len(lengths), what, seq_len)
        self.dropped = int(len(over))
        self._prompts = [np.asarray(prompts[i], np.int32) for i in keep]
        self._responses = [np.asarray(responses[i], np.int32) for i in keep]
        self._seq_len, self._specials, self._fill = seq_len, specials, fill

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)})")
        s, length = self._specials, self._seq_len
        prompt = encode_prompt(self._prompts[index], s)
        body = np.concatenate([prompt, self._responses[index], [s.eos]]).astype(np.int32)
        tokens = np.full(length, s.eos if self._fill == "eos" else s.pad, np.int32)
        tokens[: len(body)] = body
        positions = np.arange(length)
        prompt_mask = (positions < len(prompt)).astype(np.float32)
        scored_end = length if self._fill == "eos" else len(body)
        valid = (positions < scored_end).astype(np.float32)
        loss_mask = valid * (1.0 - prompt_mask)
        return {"tokens": tokens, "loss_mask": loss_mask, "prompt_mask": prompt_mask,
                "valid": valid}
