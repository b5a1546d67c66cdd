"""The input pipeline: tfds builder -> tokens (cached) -> packed sequences -> grain batches.

Tokenizing a split happens once; the tokens are cached beside the tfds files and
memory-mapped. Batching and sharding by process are in ``batching``. Prompt/response
datasets (`dlm.data.conditional`) are tokenized on load instead (they are small) and laid
out one example per sequence by `dlm.data.sft`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from dlm.data import batching, builders, conditional, packing, sft, tokenizers
from dlm.data.tasks import Example

_TOKENIZE_CHUNK = 1024  # records per encode_batch call


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared dataset and the tokenizer that goes with it."""

    builder: object  # tfds.core.DatasetBuilder
    tokenizer: tokenizers.Tokenizer

    @property
    def cache_dir(self) -> pathlib.Path:
        return pathlib.Path(str(self.builder.data_dir)) / "dlm_tokens"

    @property
    def conditional(self) -> bool:
        """Whether the dataset holds prompt/response examples (supervised fine-tuning)."""
        return conditional.is_conditional(self.builder)

    def records(self, split: str):
        """Random-access records ``{'text': bytes, 'document': int}`` of a split."""
        sources = self.builder.as_data_source()
        if split not in sources:
            raise ValueError(f"split {split!r} does not exist in dataset "
                             f"{self.builder.name!r}; available: {sorted(sources)}")
        return sources[split]


def load_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
    """Prepares the dataset named by ``data.name`` (once: a prepared one is reused) and
    builds its tokenizer. With several processes, call it on process 0 first (see
    `dlm.parallel.distributed.main_process_first`), so that no two write the dataset."""
    builder = builders.prepare_builder(data_config)
    corpus_dir = pathlib.Path(str(builder.data_dir)) / "dlm_tokens"
    kind = data_config.tokenizer
    saved = corpus_dir / f"tokenizer-{kind}-{data_config.get('bpe_vocab_size', 0)}"
    if saved.is_dir():
        return Corpus(builder, tokenizers.load_tokenizer(saved))

    def train_texts():
        source = builder.as_data_source()["train"]
        for i in range(len(source)):
            yield _text(source[i])

    tokenizer = tokenizers.build_tokenizer(
        data_config, char_vocab=builders.char_vocab(builder), train_texts=train_texts)
    if kind == "bpe":  # training is slow: keep the result beside the dataset
        _atomic_dir(saved, tokenizer.save)
    return Corpus(builder, tokenizer)


def _text(record) -> str:
    """The text of a record, a prompt/response example's prompt and response joined."""
    if "prompt" in record:
        example = conditional.record_example(record)
        return f"{example.prompt}\n{example.response}"
    text = record["text"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def examples(corpus: Corpus, split: str) -> list[Example]:
    """The prompt/response examples of a split, in order (ValueError for unconditional data)."""
    if not corpus.conditional:
        raise ValueError(f"dataset {corpus.builder.name!r} holds text, not prompt/response "
                         "examples; use data.name='task', 'jsonl' or 'gsm8k'")
    records = corpus.records(split)
    return [conditional.record_example(records[i]) for i in range(len(records))]


def _atomic_dir(path: pathlib.Path, write) -> None:
    """Calls ``write(tmp_dir)`` and renames tmp_dir to ``path``: readers never see half."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; its copy is equally good
        if not path.is_dir():
            raise


def tokenize_split(corpus: Corpus, split: str) -> packing.TokenizedSplit:
    """Returns the split as tokens, computed once and memory-mapped from a cache."""
    tok = corpus.tokenizer
    fingerprint = hashlib.sha256(
        json.dumps(_tokenizer_fingerprint(tok), sort_keys=True).encode()).hexdigest()[:16]
    path = corpus.cache_dir / f"{split}-{tok.name}-{fingerprint}"
    if not (path / "tokens.npy").exists():
        _atomic_dir(path, lambda d: _write_tokens(corpus, split, d))
    return packing.TokenizedSplit(
        tokens=np.load(path / "tokens.npy", mmap_mode="r"),
        doc_offsets=np.load(path / "doc_offsets.npy"),
    )


def _tokenizer_fingerprint(tok: tokenizers.Tokenizer) -> dict:
    return {"name": tok.name, "vocab_size": tok.vocab_size, "mask": tok.mask_id,
            "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id,
            "probe": tok.encode("The quick brown fox, 0123; Ünïcødé!\n").tolist()}


def _write_tokens(corpus: Corpus, split: str, directory: pathlib.Path) -> None:
    records = corpus.records(split)
    dtype = np.uint16 if corpus.tokenizer.vocab_size <= 2**16 else np.int32
    chunks, lengths, docs = [], [], []
    for start in range(0, len(records), _TOKENIZE_CHUNK):
        batch = [records[i] for i in range(start, min(len(records), start + _TOKENIZE_CHUNK))]
        for record, ids in zip(batch, corpus.tokenizer.encode_batch([_text(r) for r in batch])):
            chunks.append(ids.astype(dtype))
            lengths.append(len(ids))
            docs.append(int(record["document"]))
    # Records of one document are consecutive: offsets at the first record of each document.
    lengths, docs = np.asarray(lengths, np.int64), np.asarray(docs, np.int64)
    record_offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]])) if len(docs) else []
    doc_offsets = np.concatenate([record_offsets[starts], record_offsets[-1:]]).astype(np.int64)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    np.save(directory / "tokens.npy", tokens)
    np.save(directory / "doc_offsets.npy", doc_offsets)


def sequences(data_config: ml_collections.ConfigDict, corpus: Corpus, split: str):
    """Returns the random-access sequences of ``split``: one per prompt/response example
    (`sft.PromptResponseSequences`, ``data.fill`` and ``data.too_long``), else a packer
    following ``data.packing``."""
    tok = corpus.tokenizer
    if corpus.conditional:
        split_examples = examples(corpus, split)
        return sft.PromptResponseSequences(
            tok.encode_batch([e.prompt for e in split_examples]),
            tok.encode_batch([e.response for e in split_examples]),
            data_config.seq_len, sft.Specials.of(tok), fill=data_config.get("fill", "eos"),
            too_long=data_config.get("too_long", "error"),
            what=f"split {split!r} of {corpus.builder.name}")
    return packing.make_packer(
        data_config.packing, tokenize_split(corpus, split), data_config.seq_len,
        packing.Specials(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id),
        data_config.separators)


def train_iterator(data_config: ml_collections.ConfigDict, corpus: Corpus, *, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   ) -> grain.DatasetIterator:
    """Endless, shuffled (a new order every epoch) iterator over this process's batches.

    Yields dicts ``tokens`` int32 [B/P, L] and ``loss_mask`` float32 [B/P, L] (and, for
    prompt/response data, ``prompt_mask`` and ``valid``: see `sft`). The iterator's
    ``get_state()`` is a small dict to store with a checkpoint; ``set_state`` resumes exactly.
    """
    source = sequences(data_config, corpus, "train")
    ds = batching.process_batches(
        source, data_config.batch_size, "data.batch_size", "train", shuffle_seed=seed % 2**32,
        repeat=True, process_index=process_index, process_count=process_count)
    return iter(ds.to_iter_dataset())


def eval_batches(data_config: ml_collections.ConfigDict, corpus: Corpus, split: str, *,
                 num_batches: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the first ``num_batches`` (0: all full) batches of ``split``.

    Evaluation data is never shuffled, so every run scores the same sequences; the tail
    that does not fill a whole batch is left out.
    """
    source = sequences(data_config, corpus, split)
    ds = batching.process_batches(
        source, data_config.eval_batch_size, "data.eval_batch_size", split, repeat=False,
        process_index=process_index, process_count=process_count)
    count = len(ds) if num_batches <= 0 else min(num_batches, len(ds))
    return (ds[i] for i in range(count))
