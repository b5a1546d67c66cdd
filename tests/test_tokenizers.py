"""Tokenizers: round trips, GPT-2's published ids, specials and the mask id, save / load."""

import json
import shutil

import ml_collections
import numpy as np
import pytest

from dlm.data import tokenizers

UNICODE_TEXTS = [
    "Hello world",
    "",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows\nnewlines\n\n\n",
    "naïve café, Straße, Ünïcødé",
    "日本語のテキスト, 中文, 한국어",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "combining a\u0301 e\u0308 and zero\u200bwidth",
    "controls \x00\x01\x7f and U+FFFD \ufffd",
    "special strings <|endoftext|> <pad> [MASK] in plain text",
]


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> str:
    return (shared_data / "char" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2(shared_data) -> tokenizers.GPT2Tokenizer:
    return tokenizers.GPT2Tokenizer(shared_data / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def bpe(shakespeare) -> tokenizers.BPETokenizer:
    return tokenizers.BPETokenizer.train(_chunks(shakespeare[:300_000]), vocab_size=600)


def _chunks(text: str, size: int = 10_000) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _check_specials(tok: tokenizers.Tokenizer) -> None:
    assert tok.mask_id == tok.vocab_size - 1
    assert len({tok.pad_id, tok.eos_id, tok.mask_id}) == 3
    for special in (tok.pad_id, tok.bos_id, tok.eos_id):
        assert 0 <= special < tok.mask_id


def _check_never_special(tok: tokenizers.Tokenizer, texts) -> None:
    for text in texts:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert not np.isin(ids, [tok.mask_id, tok.pad_id, tok.bos_id, tok.eos_id]).any(), text
        assert ids.min(initial=0) >= 0 and ids.max(initial=0) < tok.mask_id


# ---------------------------------------------------------------- char


def test_char_vocabulary_layout_and_round_trip(shakespeare):
    tok = tokenizers.CharTokenizer.from_text(shakespeare)
    chars = sorted(set(shakespeare))
    assert tok.chars == chars and len(chars) == 65
    n = len(chars)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == tuple(range(n, n + 5))
    assert tok.vocab_size == n + 5
    _check_specials(tok)
    ids = tok.encode(shakespeare)
    assert ids.dtype == np.int32 and len(ids) == len(shakespeare)
    assert ids.tolist()[:20] == [chars.index(c) for c in shakespeare[:20]]
    assert tok.decode(ids) == shakespeare
    _check_never_special(tok, [shakespeare[:5000]])


def test_char_unknown_characters_map_to_unk():
    tok = tokenizers.CharTokenizer(["b", "a", " "])  # the given order is kept
    assert tok.encode("ab a").tolist() == [1, 0, 2, 1]
    ids = tok.encode("a€😀z")
    assert ids.tolist() == [1, tok.unk_id, tok.unk_id, tok.unk_id]
    assert tok.decode(ids) == "a<unk><unk><unk>"
    assert tok.mask_id not in ids


def test_char_decode_specials():
    tok = tokenizers.CharTokenizer(["a", "b"])
    ids = [tok.bos_id, 0, tok.mask_id, 1, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "<bos>a[MASK]b<eos><pad>"
    assert tok.decode(ids, skip_special=True) == "a[MASK]b"
    assert tok.decode(np.array([], np.int32)) == ""
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


@pytest.mark.parametrize("chars", [[], ["a", "a"], ["ab"]])
def test_char_bad_vocabulary(chars):
    with pytest.raises(ValueError):
        tokenizers.CharTokenizer(chars)


# ---------------------------------------------------------------- GPT-2


def test_gpt2_published_ids(gpt2, shared_data):
    assert gpt2.encode("Hello world").tolist() == [15496, 995]
    assert [gpt2.encode(s).tolist() for s in ["The", " the", ",", ".", "\n"]] == [
        [464], [262], [11], [13], [198]]
    # Single-token words agree with the raw encoder.json (Ġ is the byte-level space).
    encoder = json.loads((shared_data / "tokenizers/gpt2/encoder.json").read_text())
    assert gpt2.encode(" world").tolist() == [encoder["\u0120world"]]
    assert len(encoder) == 50257 and encoder["<|endoftext|>"] == 50256


def test_gpt2_specials(gpt2):
    assert gpt2.vocab_size == 50259
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.mask_id) == (50256, 50256, 50257, 50258)
    _check_specials(gpt2)
    _check_never_special(gpt2, UNICODE_TEXTS)
    ids = [15496, gpt2.mask_id, 995, gpt2.eos_id, gpt2.pad_id]
    assert gpt2.decode(ids) == "Hello[MASK] world<|endoftext|><pad>"
    assert gpt2.decode(ids, skip_special=True) == "Hello[MASK] world"


def test_gpt2_round_trip_unicode(gpt2, shakespeare):
    for text in UNICODE_TEXTS + [shakespeare[:20_000]]:
        assert gpt2.decode(gpt2.encode(text)) == text
    batch = gpt2.encode_batch(UNICODE_TEXTS)
    assert [b.tolist() for b in batch] == [gpt2.encode(t).tolist() for t in UNICODE_TEXTS]


@pytest.mark.parametrize("missing", ["encoder.json", "vocab.bpe"])
def test_gpt2_missing_file(shared_data, tmp_path, missing):
    for name in ("encoder.json", "vocab.bpe"):
        if name != missing:
            shutil.copy(shared_data / "tokenizers/gpt2" / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=missing):
        tokenizers.GPT2Tokenizer(tmp_path)


# ---------------------------------------------------------------- trained BPE


def test_bpe_train_specials_and_round_trip(bpe, shakespeare):
    assert bpe.vocab_size <= 600 and bpe.vocab_size > 259
    assert bpe.bos_id == bpe.eos_id
    _check_specials(bpe)
    _check_never_special(bpe, UNICODE_TEXTS)
    held_out = shakespeare[-20_000:]
    assert bpe.decode(bpe.encode(held_out)) == held_out
    assert len(bpe.encode(held_out)) < 0.6 * len(held_out)  # merges were learned
    for text in UNICODE_TEXTS:  # never seen in training: falls back to bytes
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_training_is_deterministic(bpe, shakespeare):
    again = tokenizers.BPETokenizer.train(_chunks(shakespeare[:300_000]), vocab_size=600)
    probe = shakespeare[-5000:]
    assert again.vocab_size == bpe.vocab_size
    assert again.encode(probe).tolist() == bpe.encode(probe).tolist()


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match="259"):
        tokenizers.BPETokenizer.train(["abc"], vocab_size=100)


# ---------------------------------------------------------------- save / load, build


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_save_load_round_trip(kind, tmp_path, shakespeare, gpt2, bpe):
    tok = {"char": tokenizers.CharTokenizer.from_text(shakespeare), "gpt2": gpt2,
           "bpe": bpe}[kind]
    tok.save(tmp_path / "tok")
    assert [p.name for p in (tmp_path / "tok").iterdir()] == [tokenizers.TOKENIZER_FILE]
    loaded = tokenizers.load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded.name == kind
    for attr in ("vocab_size", "mask_id", "bos_id", "eos_id", "pad_id"):
        assert getattr(loaded, attr) == getattr(tok, attr)
    probe = shakespeare[:3000] + (UNICODE_TEXTS[6] if kind != "char" else "")
    assert loaded.encode(probe).tolist() == tok.encode(probe).tolist()
    ids = np.concatenate([tok.encode(probe), [tok.mask_id, tok.pad_id, tok.eos_id]])
    assert loaded.decode(ids) == tok.decode(ids)


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=tokenizers.TOKENIZER_FILE):
        tokenizers.load_tokenizer(tmp_path)


def _data_config(**kwargs) -> ml_collections.ConfigDict:
    base = {"tokenizer": "char", "gpt2_dir": "", "bpe_vocab_size": 0}
    return ml_collections.ConfigDict({**base, **kwargs})


def test_build_tokenizer_kinds(shared_data, shakespeare):
    char = tokenizers.build_tokenizer(_data_config(), list("abc"), None)
    assert isinstance(char, tokenizers.CharTokenizer) and char.chars == ["a", "b", "c"]
    gpt2 = tokenizers.build_tokenizer(
        _data_config(tokenizer="gpt2", gpt2_dir=str(shared_data / "tokenizers/gpt2")), None, None)
    assert gpt2.encode("Hello world").tolist() == [15496, 995]
    bpe = tokenizers.build_tokenizer(_data_config(tokenizer="bpe", bpe_vocab_size=300), None,
                                     lambda: _chunks(shakespeare[:50_000]))
    assert isinstance(bpe, tokenizers.BPETokenizer) and bpe.vocab_size <= 300


@pytest.mark.parametrize("config, error, pattern", [
    ({"tokenizer": "words"}, ValueError, r"data\.tokenizer.*'char', 'gpt2', 'bpe'"),
    ({"tokenizer": "gpt2"}, ValueError, r"data\.gpt2_dir"),
    ({"tokenizer": "gpt2", "gpt2_dir": "/nonexistent/gpt2"}, FileNotFoundError,
     r"/nonexistent/gpt2/encoder\.json"),
    ({"tokenizer": "bpe"}, ValueError, r"data\.bpe_vocab_size"),
])
def test_build_tokenizer_errors(config, error, pattern):
    with pytest.raises(error, match=pattern):
        tokenizers.build_tokenizer(_data_config(**config), None, lambda: ["text"])


def test_build_char_needs_vocab():
    with pytest.raises(ValueError, match="char"):
        tokenizers.build_tokenizer(_data_config(), None, None)
