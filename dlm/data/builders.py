"""TFDS builders over text corpora, written as array_record and read without TensorFlow.

Every builder yields ``{'text': str, 'document': int64}`` records IN ORDER (shuffling is
disabled, so record i of a split is the i-th example generated). A document longer than
``MAX_RECORD_CHARS`` characters becomes consecutive records cut right before a
whitespace character (see ``split_document``); concatenating the records of one document
reproduces it exactly. ``document`` is the document's index within its split.

Each builder stores the sorted characters of its TRAINING split in the dataset metadata
(``char_vocab(builder)``), for character-level tokenizers.

Split rules:
  tiny_shakespeare, text_files: 'train' = first ``n * 9 // 10`` characters (which equals
    ``int(0.9 * n)``), 'validation' = the rest, cut exactly by characters.
  text8, text8_style: the text8 convention, 'train' / 'validation' / 'test' = the first 90M
    / next 5M / next 5M characters (anything past 100M is left out); a file shorter than
    100M characters is cut at ``n * 90 // 100`` and ``n * 95 // 100``.
  lm1b: 'train' = training-monolingual.tokenized.shuffled/news.en-*, 'test' =
    heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050 (the benchmark's
    test set), 'validation' = the other 49 heldout files. One sentence (line) per document.
  openwebtext: one .txt file per document; the last 100k documents are 'validation' (as
    in MDLM; the corpus has no official validation split), the others 'train'.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.resources
import json
import pathlib
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dlm.data import conditional, tfds_base

MAX_RECORD_CHARS = 32768
DEFAULT_DATA_DIR = "~/.cache/dlm/tensorflow_datasets"
TEXT8_SPLIT_CHARS = (90_000_000, 5_000_000, 5_000_000)
OWT_VALIDATION_DOCUMENTS = 100_000

_LAST_WHITESPACE = re.compile(r".*\s", re.DOTALL)


def split_document(text: str, max_chars: int = MAX_RECORD_CHARS) -> list[str]:
    """Returns consecutive pieces of ``text``, each of at most ``max_chars`` characters.

    Each cut is right before the last whitespace character that keeps the piece within
    ``max_chars``; a window with no whitespace is cut hard at ``max_chars``.
    ``"".join(pieces) == text``; an empty text gives no pieces.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        # The cut may fall at start + 1 .. start + max_chars (inclusive: the piece is full).
        match = _LAST_WHITESPACE.match(text, start + 1, start + max_chars + 1)
        cut = match.end() - 1 if match else start + max_chars
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def decode_utf8(data: bytes, source: str) -> str:
    """Returns ``data`` decoded as UTF-8; a ValueError names ``source`` and the bad offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not valid UTF-8: first bad byte 0x{data[e.start]:02x} "
                         f"at byte offset {e.start} ({e.reason})") from None


def char_vocab(builder: tfds.core.DatasetBuilder) -> list[str]:
    """Returns the sorted distinct characters of the builder's training split."""
    metadata = builder.info.metadata or {}
    if "char_vocab" not in metadata:
        raise ValueError(f"dataset {builder.info.full_name} has no char_vocab in its metadata: "
                         "prepare it with prepare_builder first")
    return list(metadata["char_vocab"])


class _TextBuilder(tfds_base.Builder, skip_registration=True):
    """Base of the text builders: record splitting of documents."""

    FEATURES = {
        "text": tfds.features.Text(),
        "document": tfds.features.Scalar(dtype=np.int64),
    }

    def _generate_examples(self, documents: Iterable[str], split: str):
        """Yields (record index, example) over the non-empty documents, in order."""
        chars, key, doc_index = set(), 0, 0
        for document in documents:
            if not document:
                continue
            if split == "train":
                chars.update(document)
            for piece in split_document(document):
                yield key, {"text": piece, "document": doc_index}
                key += 1
            doc_index += 1
        if key == 0:
            raise ValueError(f"{self.name}: split {split!r} has no text")
        if split == "train":
            self._record_char_vocab(chars)


# ---------------------------------------------------------------- local corpora


@dataclasses.dataclass(eq=False)
class LocalCorpusConfig(tfds.core.BuilderConfig):
    """A config for one local path; its name hashes the path and its files' sizes and
    modification times, so two paths (or an edited file) never share prepared data."""

    path: str = ""


def _corpus_files(path: pathlib.Path) -> list[pathlib.Path]:
    """Returns [path] for a file, or the folder's .txt files (recursive) sorted by name."""
    if path.is_file():
        return [path]
    files = sorted((p for p in path.rglob("*.txt") if p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"data.path: folder {path} contains no .txt files")
    return files


def _local_config(path, *, allow_folder: bool) -> LocalCorpusConfig:
    """Returns the config of a local corpus after checking that it exists and is not empty."""
    if not path:
        raise ValueError("data.path is empty: set it to a text file or a folder of .txt files")
    resolved = pathlib.Path(path).expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"data.path: {resolved} does not exist")
    if resolved.is_dir() and not allow_folder:
        raise ValueError(f"data.path: {resolved} is a folder; this dataset needs one text file")
    files = _corpus_files(resolved)
    stats = [(f.relative_to(resolved).as_posix(), st.st_size, st.st_mtime_ns)
             for f, st in ((f, f.stat()) for f in files)]
    if all(size == 0 for _, size, _ in stats):
        raise ValueError(f"data.path: {resolved} is empty (no text in {len(files)} file(s))")
    digest = hashlib.sha256(json.dumps([str(resolved), stats]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "_", resolved.name.lower()).strip("_")[:40] or "corpus"
    return LocalCorpusConfig(name=f"{slug}_{digest}", path=str(resolved),
                             description=f"local corpus {resolved}")


def _read_files(files: list[pathlib.Path]) -> list[str]:
    return [decode_utf8(f.read_bytes(), str(f)) for f in files]


def _check_splits(source: str, texts: dict[str, object]) -> None:
    for split, text in texts.items():
        if not text:
            raise ValueError(f"{source} is too small: split {split!r} would be empty")


def _ninety_ten(documents: list[str]) -> dict[str, list[str]]:
    """Returns {'train', 'validation'} documents: the concatenation cut at n * 9 // 10."""
    total = sum(len(d) for d in documents)
    cut, start = total * 9 // 10, 0
    splits = {"train": [], "validation": []}
    for document in documents:
        end = start + len(document)
        head = document[:max(0, cut - start)]
        tail = document[len(head):]
        if head:
            splits["train"].append(head)
        if tail:
            splits["validation"].append(tail)
        start = end
    return splits


class _LocalCorpusBuilder(_TextBuilder):
    """A builder over local files named by ``path`` (or by a ``LocalCorpusConfig``)."""

    _ALLOW_FOLDER = True

    def __init__(self, *, path=None, config=None, **kwargs):
        if config is None:
            config = _local_config(path, allow_folder=self._ALLOW_FOLDER)
        super().__init__(config=config, **kwargs)

    def _source_documents(self) -> tuple[str, list[str]]:
        """Returns (a name for errors, the documents) after decoding every file."""
        path = pathlib.Path(self.builder_config.path)
        return str(path), _read_files(_corpus_files(path))


class TinyShakespeare(_TextBuilder):
    """Tiny Shakespeare, shipped in dlm/data/corpora: one document per split, 90/10."""

    name = "tiny_shakespeare"
    _DESCRIPTION = "Tiny Shakespeare (karpathy/char-rnn), 90/10 contiguous character split."
    _HOMEPAGE = "https://github.com/karpathy/char-rnn"

    def _split_generators(self, dl_manager):
        del dl_manager
        resource = importlib.resources.files("dlm.data") / "corpora" / "tinyshakespeare.txt"
        text = decode_utf8(resource.read_bytes(), str(resource))
        splits = _ninety_ten([text])
        _check_splits(str(resource), splits)
        return {split: self._generate_examples(docs, split) for split, docs in splits.items()}


class TextFiles(_LocalCorpusBuilder):
    """A text file or a folder of .txt files (recursive, sorted by relative path).

    The files are concatenated and cut 90/10 by characters; each file, or the part of a
    file on one side of the cut, is one document.
    """

    name = "text_files"
    _DESCRIPTION = "Local text files, 90/10 contiguous character split."

    def _split_generators(self, dl_manager):
        del dl_manager
        source, documents = self._source_documents()
        splits = _ninety_ten(documents)
        _check_splits(source, splits)
        return {split: self._generate_examples(docs, split) for split, docs in splits.items()}


def text8_split_ends(n_chars: int) -> tuple[int, int, int]:
    """Returns the end offsets (train, validation, test) of the text8 split of n_chars."""
    if n_chars >= sum(TEXT8_SPLIT_CHARS):
        train, valid, test = TEXT8_SPLIT_CHARS
        return train, train + valid, train + valid + test
    return n_chars * 90 // 100, n_chars * 95 // 100, n_chars


def _text8_splits(text: str) -> dict[str, list[str]]:
    """Returns {'train', 'validation', 'test'}: one document each, by the text8 rule."""
    train_end, valid_end, test_end = text8_split_ends(len(text))
    return {"train": [text[:train_end]], "validation": [text[train_end:valid_end]],
            "test": [text[valid_end:test_end]]}


class Text8Style(_LocalCorpusBuilder):
    """A text8-style corpus file, split 90M / 5M / 5M characters (or 90/5/5 if shorter)."""

    name = "text8_style"
    _ALLOW_FOLDER = False
    _DESCRIPTION = "A local text8-style corpus with the text8 90/5/5 character split."

    def _split_generators(self, dl_manager):
        del dl_manager
        source, (text,) = self._source_documents()
        splits = _text8_splits(text)
        _check_splits(source, {split: docs[0] for split, docs in splits.items()})
        return {split: self._generate_examples(docs, split) for split, docs in splits.items()}


# ---------------------------------------------------------------- public datasets


def _manual_dir(dl_manager) -> pathlib.Path | None:
    """Returns the manual download folder if one was given and holds files, else None."""
    try:
        return pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # tfds' way of saying: no manual folder, or an empty one
        return None


class Text8(_TextBuilder):
    """Matt Mahoney's text8 (first 10^8 characters of cleaned Wikipedia), 90M/5M/5M."""

    name = "text8"
    _URL = "http://mattmahoney.net/dc/text8.zip"
    _DESCRIPTION = "text8 with the standard 90M / 5M / 5M character split."
    _HOMEPAGE = "http://mattmahoney.net/dc/textdata.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put text8.zip or the unzipped text8 file in manual_dir."

    def _split_generators(self, dl_manager):
        text = self._read(dl_manager)
        splits = _text8_splits(text)
        _check_splits("text8", {split: docs[0] for split, docs in splits.items()})
        return {split: self._generate_examples(docs, split) for split, docs in splits.items()}

    def _read(self, dl_manager) -> str:
        manual = _manual_dir(dl_manager)
        if manual is not None and (manual / "text8").is_file():
            path = manual / "text8"
            return decode_utf8(path.read_bytes(), str(path))
        if manual is not None and (manual / "text8.zip").is_file():
            path = manual / "text8.zip"
            with zipfile.ZipFile(path) as archive:
                return decode_utf8(archive.read("text8"), f"{path}:text8")
        path = pathlib.Path(dl_manager.download_and_extract(self._URL)) / "text8"
        return decode_utf8(path.read_bytes(), str(path))


class LM1B(_TextBuilder):
    """The One Billion Word benchmark; every sentence is a document (see module doc)."""

    name = "lm1b"
    _ROOT = "1-billion-word-language-modeling-benchmark-r13output"
    _URL = f"http://www.statmt.org/lm-benchmark/{_ROOT}.tar.gz"
    _TEST_FILE = "news.en.heldout-00000-of-00050"
    _DESCRIPTION = "One Billion Word benchmark; test = heldout-00000, validation = heldout 1-49."
    _HOMEPAGE = "http://www.statmt.org/lm-benchmark/"
    _CITATION = "Chelba et al. 2013, One Billion Word Benchmark for Measuring Progress in SLM."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the extracted {_ROOT}/ folder (or {_ROOT}.tar.gz) in manual_dir.")

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager) / self._ROOT
        train = sorted((root / "training-monolingual.tokenized.shuffled").glob("news.en-*"))
        heldout_dir = root / "heldout-monolingual.tokenized.shuffled"
        heldout = sorted(heldout_dir.glob("news.en.heldout-*"))
        test = [f for f in heldout if f.name == self._TEST_FILE]
        validation = [f for f in heldout if f.name != self._TEST_FILE]
        for split, files in (("train", train), ("validation", validation), ("test", test)):
            if not files:
                raise FileNotFoundError(f"lm1b: no {split} files found under {root}")
        return {split: self._generate_examples(_sentences(files), split)
                for split, files in (("train", train), ("validation", validation), ("test", test))}

    def _root(self, dl_manager) -> pathlib.Path:
        manual = _manual_dir(dl_manager)
        if manual is not None and (manual / self._ROOT).is_dir():
            return manual
        if manual is not None and (manual / f"{self._ROOT}.tar.gz").is_file():
            return pathlib.Path(dl_manager.extract(manual / f"{self._ROOT}.tar.gz"))
        return pathlib.Path(dl_manager.download_and_extract(self._URL))


def _sentences(files: list[pathlib.Path]) -> Iterator[str]:
    """Yields the lines of each file in order, without their '\\n'."""
    for path in files:
        yield from decode_utf8(path.read_bytes(), str(path)).split("\n")


class _HoldOutTail:
    """Splits a document stream into (all but the last n, the last n) in ONE pass.

    ``head()`` streams while keeping the last n documents in memory; ``tail()`` returns
    them (draining the stream first if ``head()`` was not run).
    """

    def __init__(self, documents: Callable[[], Iterable[str]], n: int, source: str):
        self._documents, self._n, self._source = documents, n, source
        self._tail: list[str] | None = None

    def head(self) -> Iterator[str]:
        buffer, count = collections.deque(), 0
        for document in self._documents():
            if not document:
                continue
            count += 1
            buffer.append(document)
            if len(buffer) > self._n:
                yield buffer.popleft()
        if count <= self._n:
            raise ValueError(f"{self._source}: {count} documents found, need more than the "
                             f"{self._n} held out for validation")
        self._tail = list(buffer)

    def tail(self) -> Iterator[str]:
        if self._tail is None:
            collections.deque(self.head(), maxlen=0)
        yield from self._tail


@dataclasses.dataclass(eq=False)
class OpenWebTextConfig(tfds.core.BuilderConfig):
    """How many of the last documents are held out as 'validation'."""

    validation_documents: int = OWT_VALIDATION_DOCUMENTS


class OpenWebText(_TextBuilder):
    """OpenWebText (Skylion007 / Hugging Face subsets): one document per .txt file.

    Sources, sorted by file name: .xz archives (tar.xz of .txt files, e.g.
    urlsf_subset00-1_data.xz) anywhere under manual_dir; if there are none, the outer
    urlsf_subsetNN.tar files that hold them; if neither, the 21 subsets are downloaded
    (not extracted: they are streamed). Inside an archive, documents are sorted by name.
    The last ``validation_documents`` documents are held in memory for 'validation'.
    """

    name = "openwebtext"
    _URLS = [f"https://huggingface.co/datasets/Skylion007/openwebtext/resolve/main/subsets/"
             f"urlsf_subset{i:02d}.tar" for i in range(21)]
    _DESCRIPTION = "OpenWebText; the last 100k documents are validation (as in MDLM)."
    _HOMEPAGE = "https://skylion007.github.io/OpenWebTextCorpus/"
    _CITATION = "Gokaslan and Cohen 2019, OpenWebText Corpus."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the urlsf_subsetNN.tar files, or the *_data.xz archives inside them, in manual_dir.")
    BUILDER_CONFIGS = [OpenWebTextConfig(name="default")]

    def __init__(self, *, validation_documents: int | None = None, **kwargs):
        if validation_documents is not None and validation_documents != OWT_VALIDATION_DOCUMENTS:
            kwargs["config"] = OpenWebTextConfig(name=f"holdout_{validation_documents}",
                                                 validation_documents=validation_documents)
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        sources = self._sources(dl_manager)
        holdout = _HoldOutTail(lambda: _owt_documents(sources), self.builder_config
                               .validation_documents, "openwebtext")
        return {"train": self._generate_examples(holdout.head(), "train"),
                "validation": self._generate_examples(holdout.tail(), "validation")}

    def _sources(self, dl_manager) -> list[pathlib.Path]:
        manual = _manual_dir(dl_manager)
        if manual is not None:
            files = [p for p in manual.rglob("*") if p.is_file()]
            for suffix in (".xz", ".tar"):
                found = sorted((p for p in files if p.name.endswith(suffix)),
                               key=lambda p: (p.name, str(p)))
                if found:
                    return found
        return [pathlib.Path(p) for p in dl_manager.download(self._URLS)]


def _owt_documents(sources: list[pathlib.Path]) -> Iterator[str]:
    """Yields the documents of every source archive (see ``OpenWebText``), in order."""
    for source in sources:
        if source.name.endswith(".xz"):
            with open(source, "rb") as f:
                yield from _owt_archive(f, str(source))
            continue
        with tarfile.open(source, "r:") as outer:
            inner = sorted((m for m in outer.getmembers()
                            if m.isfile() and m.name.endswith(".xz")), key=lambda m: m.name)
            for member in inner:
                with outer.extractfile(member) as f:
                    yield from _owt_archive(f, f"{source}:{member.name}")


def _owt_archive(fileobj, source: str) -> Iterator[str]:
    """Yields the .txt documents of one tar.xz stream, sorted by member name."""
    with tarfile.open(fileobj=fileobj, mode="r|xz") as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive
                   if m.isfile() and m.name.endswith(".txt")]
    for name, data in sorted(members):
        yield decode_utf8(data, f"{source}:{name}")


# ---------------------------------------------------------------- entry point

BUILDERS = {
    "tiny_shakespeare": TinyShakespeare,
    "text_files": TextFiles,
    "text8_style": Text8Style,
    "text8": Text8,
    "lm1b": LM1B,
    "openwebtext": OpenWebText,
    "jsonl": conditional.PromptResponseFiles,
    "gsm8k": conditional.GSM8K,
    "task": conditional.GeneratedTask,
}


def _absolute(path: str) -> pathlib.Path:
    return pathlib.Path(path).expanduser().resolve()


def prepare_builder(data_config) -> tfds.core.DatasetBuilder:
    """Returns the prepared builder named by ``data.name`` (one of ``BUILDERS``).

    Reads ``data.path`` (text_files, text8_style, jsonl), ``data.manual_dir`` (text8,
    lm1b, openwebtext, gsm8k: already-downloaded files), ``data.task``,
    ``data.task_options`` (default {}), ``data.task_seed`` (default 0) and
    ``data.task_examples`` (train, validation, test counts; default
    ``conditional.DEFAULT_TASK_EXAMPLES``) for task, and ``data.data_dir`` (default
    ``DEFAULT_DATA_DIR``). Keys an older config lacks take their defaults. Preparing is
    idempotent: a prepared dataset is reused. A failed preparation leaves no dataset
    behind (tfds writes to a temporary folder first).
    """
    name = data_config.get("name")
    if name not in BUILDERS:
        raise ValueError(f"data.name must be one of {tuple(BUILDERS)}, got {name!r}")
    kwargs = {"data_dir": str(_absolute(data_config.get("data_dir") or DEFAULT_DATA_DIR))}
    if issubclass(BUILDERS[name], (_LocalCorpusBuilder, conditional.PromptResponseFiles)):
        kwargs["path"] = data_config.get("path")
    if issubclass(BUILDERS[name], conditional.GeneratedTask):
        kwargs.update(
            task=data_config.get("task", ""),
            task_options=data_config.get("task_options", None) or {},
            task_seed=data_config.get("task_seed", 0),
            task_examples=data_config.get("task_examples", None)
            or conditional.DEFAULT_TASK_EXAMPLES)
    manual_dir = data_config.get("manual_dir") or None
    if manual_dir is not None:
        manual_dir = _absolute(manual_dir)
        if not manual_dir.is_dir():
            raise FileNotFoundError(f"data.manual_dir: {manual_dir} is not a folder")
    builder = BUILDERS[name](**kwargs)
    tfds.display_progress_bar(False)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
