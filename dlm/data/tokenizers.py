"""Tokenizers: characters, GPT-2's byte-level BPE from local files, and a trained BPE.

Every tokenizer dlm trains reserves its LAST id for the diffusion mask token: ``mask_id ==
vocab_size - 1``, appended after the real vocabulary, so it never collides with a real
token and ``encode`` never produces it. A pretrained model's tokenizer
(`PretrainedTokenizer`) keeps the model's own ids, its mask id included. Either way ``vocab_size``
is the model's embedding size. ``decode`` renders the mask id as ``MASK_TEXT`` ("[MASK]").

A tokenizer saves itself to ONE self-contained JSON file (``TOKENIZER_FILE``) in a
directory; ``load_tokenizer`` restores any kind from it.
"""

from __future__ import annotations

import abc
import json
import pathlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tokenizers as hf_tokenizers

TOKENIZER_FILE = "dlm_tokenizer.json"
MASK_TEXT = "[MASK]"
ENDOFTEXT = "<|endoftext|>"
PAD_TEXT = "<pad>"
TOKENIZER_KINDS = ("char", "gpt2", "bpe")  # data.tokenizer; saved files may also be "pretrained"


class Tokenizer(abc.ABC):
    """Text <-> int32 ids, with pad / bos / eos specials and a final mask id."""

    name: str
    # Set by each subclass's constructor.
    _size: int
    _bos: int
    _eos: int
    _pad: int

    @property
    def vocab_size(self) -> int:
        """Embedding size: real tokens, specials and the mask (the last id)."""
        return self._size

    @property
    def mask_id(self) -> int:
        return self._size - 1

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def sep_id(self) -> int:
        """The prompt/response separator (`dlm.data.sft`): BOS, whose only other place is
        position 0, so it is unambiguous."""
        return self._bos

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Returns int32 [n] ids of ``text``; no BOS/EOS are added."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Returns one int32 [n_i] array per text (see ``encode``)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Returns the text of int ids [n].

        Pad, bos and eos render as their names (e.g. "<pad>") or, with ``skip_special``,
        vanish. The mask id always renders as ``MASK_TEXT`` ("[MASK]"): it stands for
        content that is not decided yet, not for formatting.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
        ids = ids.astype(np.int64).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5]}")
        specials = self._special_texts()
        skipped = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        pieces, run = [], []
        for i in ids:
            if i in specials:
                if run:
                    pieces.append(self._decode_plain(run))
                    run = []
                if i not in skipped:
                    pieces.append(specials[i])
            else:
                run.append(i)
        if run:
            pieces.append(self._decode_plain(run))
        return "".join(pieces)

    @abc.abstractmethod
    def _special_texts(self) -> dict[int, str]:
        """Returns {id: text} for every id that ``_decode_plain`` must not see."""

    @abc.abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Returns the text of ids that are all real (non-special) tokens."""

    @abc.abstractmethod
    def _state(self) -> dict:
        """Returns a JSON-serialisable dict from which ``_from_state`` rebuilds self."""

    def save(self, directory) -> None:
        """Writes ``directory/TOKENIZER_FILE`` (creating the directory)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"format": "dlm-tokenizer", "version": 1, "kind": self.name, **self._state()}
        (directory / TOKENIZER_FILE).write_text(json.dumps(state), encoding="utf-8")


class CharTokenizer(Tokenizer):
    """One id per character, then pad, bos, eos, unk, then mask.

    Characters not in the vocabulary encode to ``unk_id`` (and decode as "<unk>"), so
    only text inside the vocabulary round-trips exactly.
    """

    name = "char"

    def __init__(self, chars: Sequence[str]):
        """``chars``: distinct single characters; id i is ``chars[i]`` (order is kept)."""
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer vocabulary entries must be single "
                                 f"characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary has duplicate characters")
        self.chars = chars
        n = len(chars)
        self._pad, self._bos, self._eos, self.unk_id = n, n + 1, n + 2, n + 3
        self._size = n + 5
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._order = np.argsort(codes).astype(np.int32)
        self._sorted_codes = codes[self._order]
        self._texts = chars + [PAD_TEXT, "<bos>", "<eos>", "<unk>", MASK_TEXT]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Returns a tokenizer over the sorted distinct characters of ``text``."""
        return cls(sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        where = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self.chars) - 1)
        known = self._sorted_codes[where] == codes
        return np.where(known, self._order[where], self.unk_id).astype(np.int32)

    def decode(self, ids, *, skip_special: bool = False) -> str:
        # Fast path of the base method: every id has a fixed text.
        ids = np.asarray(ids)
        if ids.ndim == 1 and (len(ids) == 0 or (ids.min() >= 0 and ids.max() < self.vocab_size)):
            keep = ids[~np.isin(ids, [self._pad, self._bos, self._eos])] if skip_special else ids
            return "".join(self._texts[i] for i in keep.tolist())
        return super().decode(ids, skip_special=skip_special)

    def _special_texts(self) -> dict[int, str]:
        return {i: self._texts[i] for i in range(len(self.chars), self.vocab_size)}

    def _decode_plain(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def _state(self) -> dict:
        return {"chars": self.chars}


class _HFBacked(Tokenizer):
    """A tokenizer held by an HF ``tokenizers.Tokenizer`` (``self._hf``): encodes without
    adding specials, decodes real tokens through it."""

    _hf: hf_tokenizers.Tokenizer

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._hf.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def _decode_plain(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)


class _ByteLevelBPE(_HFBacked):
    """A byte-level BPE held by an HF ``tokenizers.Tokenizer``; the mask id follows it.

    Every byte has a token, so any unicode text round-trips exactly. Special token
    strings that appear in the text (e.g. "<|endoftext|>") are encoded as ordinary
    text, never as the special id.
    """

    def __init__(self, hf: hf_tokenizers.Tokenizer, *, eos_id: int, pad_id: int):
        self._hf = hf
        self._hf.encode_special_tokens = True
        self._bos = self._eos = eos_id
        self._pad = pad_id
        # The pad may live just past the HF vocabulary (GPT-2 has none); the mask comes last.
        self._size = max(hf.get_vocab_size(with_added_tokens=True), pad_id + 1) + 1
        if not (eos_id < self.mask_id and pad_id < self.mask_id and eos_id != pad_id):
            raise ValueError(f"bad special ids eos={eos_id} pad={pad_id} for vocab {self._size}")

    def _special_texts(self) -> dict[int, str]:
        return {self._eos: ENDOFTEXT, self._pad: PAD_TEXT, self.mask_id: MASK_TEXT}

    def _state(self) -> dict:
        return {"hf_tokenizer": json.loads(self._hf.to_str()), "eos_id": self._eos,
                "pad_id": self._pad}

    @classmethod
    def _from_hf(cls, hf: hf_tokenizers.Tokenizer, *, eos_id: int, pad_id: int):
        """Returns an instance of ``cls`` around ``hf``, bypassing the subclass constructor."""
        tokenizer = cls.__new__(cls)
        _ByteLevelBPE.__init__(tokenizer, hf, eos_id=eos_id, pad_id=pad_id)
        return tokenizer

    @classmethod
    def _from_state(cls, state: dict):
        hf = hf_tokenizers.Tokenizer.from_str(json.dumps(state["hf_tokenizer"]))
        return cls._from_hf(hf, eos_id=state["eos_id"], pad_id=state["pad_id"])


class PretrainedTokenizer(_HFBacked):
    """A pretrained model's tokenizer (its folder's ``tokenizer.json``) with the model's ids.

    `vocab_size` is the model's embedding size (it may exceed the tokenizer's vocabulary:
    Qwen2 pads its embedding). The mask id is the model's (LLaDA 126336, Dream 151666); a
    causal LM has none and gets the last embedding row, which these families leave unused
    (reserved or padding), as the id no sampler produces. A model without a BOS uses its EOS
    (as dlm's GPT-2); without a pad, its EOS. Special-token strings in the text (a chat
    template's ``<|im_start|>``) encode as their ids, as the model was trained.
    """

    name = "pretrained"

    def __init__(self, hf: hf_tokenizers.Tokenizer, *, vocab_size: int, bos_id: int,
                 eos_id: int, pad_id: int, mask_id: int, chat_template: str | None = None):
        self._hf, self._size = hf, int(vocab_size)
        self._bos, self._eos, self._pad, self._mask = bos_id, eos_id, pad_id, mask_id
        self.chat_template = chat_template
        for key, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id),
                           ("mask", mask_id)):
            if not isinstance(value, int) or not 0 <= value < self._size:
                raise ValueError(f"the {key} id {value!r} is not a token id below the "
                                 f"model's vocabulary size {self._size}")

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def sep_id(self) -> None:
        """None: the model was not trained with a separator; a response follows its prompt."""
        return None

    def _special_texts(self) -> dict[int, str]:
        texts = {i: self._hf.id_to_token(i) or f"<{key}>" for key, i in
                 (("pad", self._pad), ("eos", self._eos), ("bos", self._bos))}
        return {**texts, self._mask: MASK_TEXT}

    def _state(self) -> dict:
        return {"hf_tokenizer": json.loads(self._hf.to_str()), "vocab_size": self._size,
                "bos_id": self._bos, "eos_id": self._eos, "pad_id": self._pad,
                "mask_id": self._mask, "chat_template": self.chat_template}

    @classmethod
    def _from_state(cls, state: dict) -> PretrainedTokenizer:
        hf = hf_tokenizers.Tokenizer.from_str(json.dumps(state["hf_tokenizer"]))
        return cls(hf, vocab_size=state["vocab_size"], bos_id=state["bos_id"],
                   eos_id=state["eos_id"], pad_id=state["pad_id"], mask_id=state["mask_id"],
                   chat_template=state.get("chat_template"))


def _byte_level(model) -> hf_tokenizers.Tokenizer:
    hf = hf_tokenizers.Tokenizer(model)
    hf.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = hf_tokenizers.decoders.ByteLevel()
    return hf


class GPT2Tokenizer(_ByteLevelBPE):
    """GPT-2's BPE from ``encoder.json`` and ``vocab.bpe`` in a local directory.

    Ids 0..50256 are GPT-2's (bos = eos = 50256, "<|endoftext|>"), pad = 50257,
    mask = 50258; vocab_size = 50259.
    """

    name = "gpt2"

    def __init__(self, directory):
        directory = pathlib.Path(directory).expanduser()
        paths = [directory / "encoder.json", directory / "vocab.bpe"]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
        hf = _byte_level(hf_tokenizers.models.BPE.from_file(*map(str, paths)))
        eos = hf.token_to_id(ENDOFTEXT)
        if eos is None:
            raise ValueError(f"{paths[0]} has no {ENDOFTEXT!r} token")
        super().__init__(hf, eos_id=eos, pad_id=hf.get_vocab_size())


class BPETokenizer(_ByteLevelBPE):
    """A byte-level BPE trained on a corpus: "<|endoftext|>" (bos = eos), "<pad>", mask."""

    name = "bpe"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Trains on ``texts``; the result's ``vocab_size`` (mask included) is at most
        ``vocab_size`` (less when the corpus has fewer distinct merges)."""
        minimum = 256 + 3  # every byte, two specials, the mask
        if vocab_size < minimum:
            raise ValueError(f"bpe vocab_size must be at least {minimum}, got {vocab_size}")
        hf = _byte_level(hf_tokenizers.models.BPE())
        trainer = hf_tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size - 1, special_tokens=[ENDOFTEXT, PAD_TEXT], show_progress=False,
            initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls._from_hf(hf, eos_id=hf.token_to_id(ENDOFTEXT), pad_id=hf.token_to_id(PAD_TEXT))


def load_tokenizer(directory) -> Tokenizer:
    """Returns the tokenizer that ``Tokenizer.save(directory)`` wrote."""
    path = pathlib.Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no saved tokenizer: {path} does not exist")
    state = json.loads(path.read_text(encoding="utf-8"))
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer._from_state(state)
    if kind == "bpe":
        return BPETokenizer._from_state(state)
    if kind == "pretrained":
        return PretrainedTokenizer._from_state(state)
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; expected one of "
                     f"{TOKENIZER_KINDS}")


def build_tokenizer(data_config, char_vocab: Sequence[str] | None,
                    train_texts: Callable[[], Iterable[str]] | None) -> Tokenizer:
    """Returns the tokenizer named by ``data.tokenizer`` (one of ``TOKENIZER_KINDS``).

    'char' uses ``char_vocab`` (the training split's characters); 'gpt2' reads
    ``data.gpt2_dir``; 'bpe' trains ``data.bpe_vocab_size`` tokens on ``train_texts()``.
    """
    kind = data_config.get("tokenizer")
    if kind == "char":
        if char_vocab is None:
            raise ValueError("data.tokenizer='char' needs the dataset's character vocabulary")
        return CharTokenizer(char_vocab)
    if kind == "gpt2":
        directory = data_config.get("gpt2_dir")
        if not directory:
            raise ValueError("data.tokenizer='gpt2' needs data.gpt2_dir, the folder with "
                             "encoder.json and vocab.bpe")
        try:
            return GPT2Tokenizer(directory)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (data.gpt2_dir={directory!r})") from e
    if kind == "bpe":
        size = data_config.get("bpe_vocab_size")
        if not size:
            raise ValueError("data.tokenizer='bpe' needs data.bpe_vocab_size (an int >= 259)")
        if train_texts is None:
            raise ValueError("data.tokenizer='bpe' needs the training texts to train on")
        return BPETokenizer.train(train_texts(), int(size))
    raise ValueError(f"data.tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")
