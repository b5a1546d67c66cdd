"""TFDS builders: split sizes from the raw files, exact text, record order, char vocab,
error messages, and the public datasets built offline from fake files in their formats."""

import hashlib
import io
import pathlib
import random
import sys
import tarfile
import zipfile

import ml_collections
import pytest
import tensorflow_datasets as tfds

from dlm.data import builders


def _config(tmp_path, **kwargs) -> ml_collections.ConfigDict:
    base = {"name": "text_files", "path": "", "manual_dir": "",
            "data_dir": str(tmp_path / "tfds")}
    return ml_collections.ConfigDict({**base, **kwargs})


def _records(builder, split) -> list[tuple[str, int]]:
    """Returns (text, document) of every record of ``split``, in record order."""
    source = builder.as_data_source()[split]
    return [(source[i]["text"].decode("utf-8"), int(source[i]["document"]))
            for i in range(len(source))]


def _documents(records) -> list[str]:
    """Joins consecutive records of a document; checks indices run 0, 1, 2, ..."""
    docs = []
    for text, doc in records:
        assert len(text) <= builders.MAX_RECORD_CHARS
        if doc == len(docs) - 1:
            docs[-1] += text
        else:
            assert doc == len(docs), "document indices must be consecutive, in order"
            docs.append(text)
    return docs


def _check_cuts(pieces: list[str], max_chars: int) -> None:
    """Every cut is before the LAST whitespace of its window, or hard when there is none."""
    text = "".join(pieces)
    start = 0
    for piece in pieces[:-1]:
        cut = start + len(piece)
        window = text[start + 1:start + max_chars + 1]
        if any(c.isspace() for c in window):
            assert text[cut].isspace()
            assert not any(c.isspace() for c in text[cut + 1:start + max_chars + 1])
        else:
            assert len(piece) == max_chars
        start = cut


# ---------------------------------------------------------------- record splitting


def test_split_document_properties():
    rng = random.Random(0)
    alphabet = ["a", "b", "é", "😀", " ", "\n", "\t", "\u3000", "\u00a0"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) if rng.random() < 0.7 else "x" * rng.randint(0, 30)
                       for _ in range(rng.randint(0, 120)))
        max_chars = rng.randint(1, 25)
        pieces = builders.split_document(text, max_chars)
        assert "".join(pieces) == text
        assert all(0 < len(p) <= max_chars for p in pieces)
        _check_cuts(pieces, max_chars)
    assert builders.split_document("") == []
    assert builders.split_document("abcdefgh", 3) == ["abc", "def", "gh"]
    assert builders.split_document("ab cd ef", 5) == ["ab cd", " ef"]
    assert builders.split_document("abc defgh ij", 4) == ["abc", " def", "gh", " ij"]


# ---------------------------------------------------------------- bundled and local corpora


def test_tiny_shakespeare(tmp_path, shared_data):
    raw_path = shared_data / "char" / "tinyshakespeare.txt"
    raw = raw_path.read_text(encoding="utf-8")
    packaged = pathlib.Path(builders.__file__).parent / "corpora" / "tinyshakespeare.txt"
    sums_file = shared_data / "SHA256SUMS"
    sums = dict(line.split()[::-1] for line in sums_file.read_text().splitlines())
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() == sums["char/tinyshakespeare.txt"]

    builder = builders.prepare_builder(_config(tmp_path, name="tiny_shakespeare"))
    assert builder.info.disable_shuffling
    cut = int(0.9 * len(raw))
    expected = {"train": raw[:cut], "validation": raw[cut:]}
    assert set(builder.info.splits.keys()) == set(expected)
    for split, text in expected.items():
        records = _records(builder, split)
        assert _documents(records) == [text]  # one document, exact text
        assert [t for t, _ in records] == builders.split_document(text)  # generation order
        _check_cuts([t for t, _ in records], builders.MAX_RECORD_CHARS)
    assert len(_records(builder, "train")) > 1
    assert builders.char_vocab(builder) == sorted(set(raw[:cut]))
    assert "tensorflow" not in sys.modules  # preparing and reading never import TensorFlow


def test_text8_style_offline8(tmp_path, shared_data):
    path = shared_data / "char" / "offline8.txt"
    raw = path.read_text(encoding="utf-8")
    n = len(raw)
    assert n < 100_000_000
    ends = [int(0.9 * n), int(0.95 * n), n]
    assert builders.text8_split_ends(n) == tuple(ends)
    builder = builders.prepare_builder(_config(tmp_path, name="text8_style", path=str(path)))
    expected = {"train": raw[:ends[0]], "validation": raw[ends[0]:ends[1]],
                "test": raw[ends[1]:]}
    for split, text in expected.items():
        assert _documents(_records(builder, split)) == [text]
    assert builders.char_vocab(builder) == sorted(set(raw[:ends[0]]))


def test_text8_split_ends_of_large_files():
    assert builders.text8_split_ends(100_000_000) == (90_000_000, 95_000_000, 100_000_000)
    assert builders.text8_split_ends(123_456_789) == (90_000_000, 95_000_000, 100_000_000)
    assert builders.text8_split_ends(1000) == (900, 950, 1000)


def _write_folder(root: pathlib.Path) -> list[str]:
    """Writes a corpus folder; returns the texts of its .txt files sorted by relative path."""
    rng = random.Random(1)
    words = ["alpha", "beta", "γάμμα", "δέλτα", "😀", "naïve", "x" * 40]
    long_text = "".join(rng.choice(words) + rng.choice([" ", "\n", "\r\n", "\t"])
                        for _ in range(12_000))
    files = {"b.txt": long_text, "a.txt": "first file\r\nwith windows newlines\n",
             "sub/c.txt": "nested ünïcode\n" * 50, "empty.txt": "", "notes.md": "ignored"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    return [files[name] for name in ["a.txt", "b.txt", "empty.txt", "sub/c.txt"]]


def test_text_files_folder(tmp_path):
    corpus = tmp_path / "corpus"
    texts = _write_folder(corpus)
    builder = builders.prepare_builder(_config(tmp_path, path=str(corpus)))
    cut = int(0.9 * sum(len(t) for t in texts))
    # Independent split: walk the files, cutting the concatenation at `cut`.
    train, validation, offset = [], [], 0
    for text in texts:
        train.append(text[:max(0, cut - offset)])
        validation.append(text[max(0, cut - offset):])
        offset += len(text)
    assert "".join(train) == "".join(texts)[:cut]
    assert _documents(_records(builder, "train")) == [t for t in train if t]
    assert _documents(_records(builder, "validation")) == [t for t in validation if t]
    assert len(_records(builder, "train")) > len(texts)  # the long file was split
    assert builders.char_vocab(builder) == sorted(set("".join(texts)[:cut]))


def test_text_files_single_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("0123456789" * 3, encoding="utf-8")
    builder = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert _records(builder, "train") == [("0123456789" * 2 + "0123456", 0)]
    assert _records(builder, "validation") == [("789", 0)]


def test_two_paths_do_not_collide(tmp_path):
    paths = []
    for i, text in enumerate(["first corpus text " * 10, "second, different text " * 10]):
        (tmp_path / f"d{i}").mkdir()
        paths.append(tmp_path / f"d{i}" / "corpus.txt")
        paths[-1].write_text(text, encoding="utf-8")
    built = [builders.prepare_builder(_config(tmp_path, path=str(p))) for p in paths]
    assert built[0].data_dir != built[1].data_dir
    for path, builder in zip(paths, built):
        text = path.read_text(encoding="utf-8")
        splits = ("train", "validation")
        assert "".join(t for split in splits for t, _ in _records(builder, split)) == text


def test_prepare_is_idempotent_and_reloads_vocab(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("some words here\n" * 100, encoding="utf-8")
    config = _config(tmp_path, path=str(path))
    first = builders.prepare_builder(config)
    info_file = pathlib.Path(first.data_dir) / "dataset_info.json"
    stamp = info_file.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a prepared dataset must not be generated again")

    monkeypatch.setattr(builders.TextFiles, "_split_generators", fail)
    second = builders.prepare_builder(config)
    assert second.data_dir == first.data_dir and info_file.stat().st_mtime_ns == stamp
    assert builders.char_vocab(second) == sorted(set("some words here\n"))
    assert _records(second, "validation") == _records(first, "validation")


def test_data_dir_default_and_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    builder = builders.prepare_builder(_config(tmp_path, name="tiny_shakespeare", data_dir=""))
    expected = tmp_path / "home" / ".cache" / "dlm" / "tensorflow_datasets"
    assert pathlib.Path(builder.data_dir).is_relative_to(expected)
    monkeypatch.chdir(tmp_path)
    builder = builders.prepare_builder(_config(tmp_path, name="tiny_shakespeare", data_dir="rel"))
    assert pathlib.Path(builder.data_dir).is_relative_to(tmp_path / "rel")


# ---------------------------------------------------------------- bad input


def _no_dataset_left(tmp_path, name: str) -> bool:
    root = tmp_path / "tfds" / name
    return not root.exists() or not any("1.0.0" in p.name for p in root.rglob("*"))


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=rf"data\.path.*{missing}"):
        builders.prepare_builder(_config(tmp_path, path=str(missing)))
    with pytest.raises(ValueError, match=r"data\.path"):
        builders.prepare_builder(_config(tmp_path, path=""))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'empty.txt'}.*empty"):
        builders.prepare_builder(_config(tmp_path, path=str(tmp_path / "empty.txt")))
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "no_txt" / "readme.md").write_text("not a .txt file")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'no_txt'}.*no \.txt"):
        builders.prepare_builder(_config(tmp_path, path=str(tmp_path / "no_txt")))
    (tmp_path / "one_char.txt").write_text("a")
    with pytest.raises(ValueError, match="too small"):
        builders.prepare_builder(_config(tmp_path, path=str(tmp_path / "one_char.txt")))
    assert _no_dataset_left(tmp_path, "text_files")


@pytest.mark.parametrize("name", ["text_files", "text8_style"])
def test_bad_utf8_names_file_and_offset(tmp_path, name):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text " * 10, encoding="utf-8")
    bad = folder / "b.txt"
    bad.write_bytes("héllo wörld ".encode() + b"\xff\xfe rest")
    path = folder if name == "text_files" else bad
    for _ in range(2):  # a failed preparation must fail again, not reuse half a dataset
        with pytest.raises(ValueError, match=rf"{bad}.*UTF-8.*offset 14\b"):
            builders.prepare_builder(_config(tmp_path, name=name, path=str(path)))
        assert _no_dataset_left(tmp_path, name)
    assert not list((tmp_path / "tfds").rglob("*incomplete*"))


def test_text8_style_needs_a_file(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match=r"data\.path.*folder"):
        builders.prepare_builder(_config(tmp_path, name="text8_style", path=str(tmp_path / "dir")))


def test_unknown_name_and_missing_manual_dir(tmp_path):
    with pytest.raises(ValueError, match=r"data\.name.*'tiny_shakespeare'.*'openwebtext'"):
        builders.prepare_builder(_config(tmp_path, name="wikitext"))
    with pytest.raises(FileNotFoundError, match=r"data\.manual_dir"):
        builders.prepare_builder(_config(tmp_path, name="text8", manual_dir=str(tmp_path / "x")))


# ---------------------------------------------------------------- public datasets, offline


def _text8_like(n: int) -> str:
    rng = random.Random(2)
    words = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "first", "used"]
    text = ""
    while len(text) < n:
        text += " " + rng.choice(words)
    return text[:n]


@pytest.mark.parametrize("form", ["zip", "plain"])
def test_text8_from_manual_dir(tmp_path, form):
    raw = _text8_like(50_000)
    manual = tmp_path / "manual"
    manual.mkdir()
    if form == "zip":
        with zipfile.ZipFile(manual / "text8.zip", "w") as archive:
            archive.writestr("text8", raw)
    else:
        (manual / "text8").write_text(raw)
    builder = builders.prepare_builder(_config(tmp_path, name="text8", manual_dir=str(manual)))
    ends = [int(0.9 * len(raw)), int(0.95 * len(raw))]
    assert _documents(_records(builder, "train")) == [raw[:ends[0]]]
    assert _documents(_records(builder, "validation")) == [raw[ends[0]:ends[1]]]
    assert _documents(_records(builder, "test")) == [raw[ends[1]:]]
    assert builders.char_vocab(builder) == sorted(set(raw[:ends[0]]))


def test_lm1b_from_manual_dir(tmp_path):
    root = tmp_path / "manual" / "1-billion-word-language-modeling-benchmark-r13output"
    rng = random.Random(3)

    def sentences(k):
        return [" ".join(rng.choice(["The", "cat", "sat", ",", "ünï", "."]) for _ in range(9))
                for _ in range(k)]

    files = {}
    for i in (1, 2):
        files[f"training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100"] = sentences(7)
    files["training-monolingual.tokenized.shuffled/news.en-00002-of-00100"].append(
        "long " * 10_000)  # one sentence of 50k characters
    for i in (0, 1, 2):
        name = f"heldout-monolingual.tokenized.shuffled/news.en.heldout-{i:05d}-of-00050"
        files[name] = sentences(4)
    for name, lines in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    builder = builders.prepare_builder(
        _config(tmp_path, name="lm1b", manual_dir=str(tmp_path / "manual")))
    train = [s for name in sorted(files) if "training" in name for s in files[name]]
    heldout = [name for name in sorted(files) if "heldout" in name]
    assert _documents(_records(builder, "train")) == train
    assert _documents(_records(builder, "test")) == files[heldout[0]]
    assert _documents(_records(builder, "validation")) == files[heldout[1]] + files[heldout[2]]
    assert builders.char_vocab(builder) == sorted(set("".join(train)))


def _tar_xz(documents: dict[str, str]) -> bytes:
    """Returns a tar.xz archive of .txt files (the inner OpenWebText format)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for name, text in documents.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _owt_subsets() -> dict[str, dict[str, str]]:
    """Returns {inner archive name: {member name: text}}; members deliberately unsorted."""
    rng = random.Random(4)
    subsets = {}
    for name in ["urlsf_subset00-2_data.xz", "urlsf_subset00-1_data.xz"]:
        docs = {f"{rng.randrange(10**6):07d}-{k}.txt": f"Document {k} of {name}.\n\nÜnïcode ✓ "
                * rng.randint(1, 50) for k in range(4)}
        subsets[name] = docs
    subsets["urlsf_subset00-1_data.xz"]["0000000-long.txt"] = "word " * 8000
    return subsets


def _owt_expected(subsets) -> list[str]:
    return [subsets[a][m] for a in sorted(subsets) for m in sorted(subsets[a])]


@pytest.mark.parametrize("form", ["inner_xz", "outer_tar"])
def test_openwebtext_from_manual_dir(tmp_path, form):
    subsets = _owt_subsets()
    manual = tmp_path / "manual"
    (manual / "openwebtext").mkdir(parents=True)
    if form == "inner_xz":
        for name, docs in subsets.items():
            (manual / "openwebtext" / name).write_bytes(_tar_xz(docs))
    else:
        with tarfile.open(manual / "urlsf_subset00.tar", "w") as outer:
            for name, docs in subsets.items():
                data = _tar_xz(docs)
                info = tarfile.TarInfo(f"openwebtext/{name}")
                info.size = len(data)
                outer.addfile(info, io.BytesIO(data))
    builder = builders.OpenWebText(validation_documents=3, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    expected = _owt_expected(subsets)
    assert _documents(_records(builder, "train")) == expected[:-3]
    assert _documents(_records(builder, "validation")) == expected[-3:]
    assert builders.char_vocab(builder) == sorted(set("".join(expected[:-3])))


def test_openwebtext_needs_more_documents_than_held_out(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "urlsf_subset00-1_data.xz").write_bytes(_tar_xz({"a.txt": "one", "b.txt": "two"}))
    with pytest.raises(ValueError, match="2 documents found.*100000"):
        builders.prepare_builder(_config(tmp_path, name="openwebtext", manual_dir=str(manual)))
    assert _no_dataset_left(tmp_path, "openwebtext")


def test_downloads_when_no_manual_files(tmp_path, monkeypatch):
    """The download code paths, with tfds' download manager faked: URLs and file layout."""
    requested = []
    raw = _text8_like(20_000)
    subsets = _owt_subsets()

    def download_and_extract(self, url):
        requested.append(url)
        extracted = tmp_path / "extracted"
        extracted.mkdir(exist_ok=True)
        (extracted / "text8").write_text(raw)
        return extracted

    def download(self, urls):
        requested.extend(urls)
        paths = [tmp_path / f"download{i}.tar" for i in range(len(urls))]
        for i in range(len(urls)):
            with tarfile.open(paths[i], "w") as outer:
                for name, docs in (subsets.items() if i == 0 else []):
                    data = _tar_xz(docs)
                    info = tarfile.TarInfo(f"openwebtext/{name}")
                    info.size = len(data)
                    outer.addfile(info, io.BytesIO(data))
        return paths

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    text8 = builders.prepare_builder(_config(tmp_path, name="text8"))
    assert requested == ["http://mattmahoney.net/dc/text8.zip"]
    assert "".join(t for s in ("train", "validation", "test") for t, _ in _records(text8, s)) == raw

    requested.clear()
    owt = builders.OpenWebText(validation_documents=2, data_dir=str(tmp_path / "tfds"))
    owt.download_and_prepare()
    assert requested == [
        "https://huggingface.co/datasets/Skylion007/openwebtext/resolve/main/subsets/"
        f"urlsf_subset{i:02d}.tar" for i in range(21)]
    assert _documents(_records(owt, "validation")) == _owt_expected(subsets)[-2:]
