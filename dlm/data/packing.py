"""Fixed-length sequences from a tokenized split: MDLM's "wrap" and a padded "pad" mode.

A tokenized split is one flat token array plus document offsets. Both packers are random
access (``len`` and ``__getitem__``), so a grain ``MapDataset`` can shuffle them globally and
its iterator state is just an index.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """A split as tokens: document d is ``tokens[doc_offsets[d]:doc_offsets[d + 1]]``.

    Attributes:
      tokens: int array [num_tokens] (uint16 or int32 on disk), no separators.
      doc_offsets: int64 [num_docs + 1], starting at 0, non-decreasing.
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray

    def __post_init__(self):
        offsets = self.doc_offsets
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(self.tokens):
            raise ValueError(
                "doc_offsets must start at 0 and end at len(tokens); got "
                f"{offsets[:1]}..{offsets[-1:]} for {len(self.tokens)} tokens"
            )

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1


@dataclasses.dataclass(frozen=True)
class Specials:
    bos: int
    eos: int
    pad: int


class WrappedSequences:
    """MDLM's "wrap" packing: documents concatenated, cut into fixed-length pieces.

    With ``separators`` (MDLM's convention) every document is wrapped as
    ``[BOS] doc [EOS]``, the concatenation is cut into pieces of ``seq_len - 2`` tokens and
    each piece becomes ``[BOS] piece [EOS]``. Without separators (the text8 convention of
    MD4) the bare token stream is cut into pieces of ``seq_len``. The tail shorter than one
    piece is dropped. Every sequence is all real tokens, so ``loss_mask`` is all ones.
    """

    def __init__(self, split: TokenizedSplit, seq_len: int, specials: Specials,
                 separators: bool):
        self._split = split
        self._seq_len = seq_len
        self._specials = specials
        self._separators = separators
        self._piece = seq_len - 2 if separators else seq_len
        if self._piece < 1:
            raise ValueError(f"data.seq_len={seq_len} leaves no room for tokens between the "
                             "BOS/EOS separators; use data.seq_len >= 3")
        # Document d starts at offset[d] + 2 d in the stream with separators.
        num_docs = split.num_docs
        extra = 2 * np.arange(num_docs + 1, dtype=np.int64) if separators else 0
        self._stream_offsets = split.doc_offsets.astype(np.int64) + extra
        self._len = int(self._stream_offsets[-1]) // self._piece

    def __len__(self) -> int:
        return self._len

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Returns int32 [stop - start]: the separator-wrapped stream between two offsets."""
        if not self._separators:
            return np.asarray(self._split.tokens[start:stop], dtype=np.int32)
        offsets, tokens = self._stream_offsets, self._split.tokens
        doc = int(np.searchsorted(offsets, start, side="right")) - 1
        parts, pos = [], start
        while pos < stop:
            doc_start, doc_stop = int(offsets[doc]), int(offsets[doc + 1])
            body_start, body_len = int(self._split.doc_offsets[doc]), doc_stop - doc_start - 2
            lo, hi = pos - doc_start, min(stop, doc_stop) - doc_start  # within [BOS] doc [EOS]
            if lo == 0:
                parts.append([self._specials.bos])
            b0, b1 = max(lo, 1) - 1, min(hi, body_len + 1) - 1
            if b1 > b0:
                parts.append(tokens[body_start + b0: body_start + b1])
            if hi == body_len + 2:
                parts.append([self._specials.eos])
            pos, doc = doc_start + hi, doc + 1
        return np.concatenate(parts).astype(np.int32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range [0, {self._len})")
        piece = self._stream(index * self._piece, (index + 1) * self._piece)
        if self._separators:
            piece = np.concatenate([[self._specials.bos], piece, [self._specials.eos]])
        return {
            "tokens": piece.astype(np.int32),
            "loss_mask": np.ones(self._seq_len, np.float32),
        }


class PaddedSequences:
    """One sequence per document, truncated to ``seq_len`` and right-padded with PAD.

    With ``separators`` a sequence is ``[BOS] doc[:seq_len - 2] [EOS] PAD...``; without, it is
    ``doc[:seq_len] PAD...``. ``loss_mask`` is 1 exactly on the non-pad positions.
    """

    def __init__(self, split: TokenizedSplit, seq_len: int, specials: Specials,
                 separators: bool):
        body = seq_len - 2 if separators else seq_len
        if body < 1:
            raise ValueError(f"data.seq_len={seq_len} leaves no room for tokens between the "
                             "BOS/EOS separators; use data.seq_len >= 3")
        self._split, self._seq_len, self._body = split, seq_len, body
        self._specials, self._separators = specials, separators

    def __len__(self) -> int:
        return self._split.num_docs

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        start, stop = self._split.doc_offsets[index: index + 2]
        doc = np.asarray(self._split.tokens[start: min(stop, start + self._body)], np.int32)
        if self._separators:
            doc = np.concatenate([[self._specials.bos], doc, [self._specials.eos]])
        tokens = np.full(self._seq_len, self._specials.pad, np.int32)
        tokens[: len(doc)] = doc
        loss_mask = np.zeros(self._seq_len, np.float32)
        loss_mask[: len(doc)] = 1.0
        return {"tokens": tokens, "loss_mask": loss_mask}


def make_packer(mode: str, split: TokenizedSplit, seq_len: int, specials: Specials,
                separators: bool) -> WrappedSequences | PaddedSequences:
    """Returns the random-access packer for ``data.packing`` in {'wrap', 'pad'}."""
    if seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2, got {seq_len}")
    if mode not in PACKERS:
        raise ValueError(f"data.packing={mode!r} is not one of {sorted(PACKERS)}")
    return PACKERS[mode](split, seq_len, specials, separators)


# `data.packing` -> packer class.
PACKERS = {"wrap": WrappedSequences, "pad": PaddedSequences}
