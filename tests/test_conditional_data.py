"""Prompt/response TFDS builders (dlm.data.conditional): split rules, exact records in
order, the char vocabulary, error messages naming file and line, cache keys, and the
input pipeline on top of them. Everything is built offline from files written here."""

import json
import os
import pathlib
import re

import ml_collections
import numpy as np
import pytest

from dlm.data import builders, conditional, pipeline, sft, tasks
from dlm.data.tasks import Example


def _config(tmp_path, **kwargs) -> ml_collections.ConfigDict:
    base = {"name": "jsonl", "path": "", "manual_dir": "",
            "data_dir": str(tmp_path / "tfds"), "task": "", "task_options": {},
            "task_seed": 0, "task_examples": (20_000, 500, 500)}
    return ml_collections.ConfigDict({**base, **kwargs})


def _pipeline_config(tmp_path, **kwargs) -> ml_collections.ConfigDict:
    base = {"tokenizer": "char", "gpt2_dir": "", "bpe_vocab_size": 0, "seq_len": 64,
            "batch_size": 4, "eval_batch_size": 2, "packing": "wrap", "separators": False,
            "fill": "eos", "too_long": "error"}
    return _config(tmp_path, **{**base, **kwargs})


def _records(builder, split) -> list[Example]:
    """The examples of ``split`` in record order; checks each record's 'example' index."""
    source = builder.as_data_source()[split]
    out = []
    for i in range(len(source)):
        record = source[i]
        assert int(record["example"]) == i
        out.append(conditional.record_example(record))
    return out


def _line(example: Example, with_answer: bool) -> str:
    value = {"prompt": example.prompt, "response": example.response}
    if with_answer:
        value["answer"] = example.answer
    return json.dumps(value, ensure_ascii=False)


def _write_jsonl(path: pathlib.Path, examples: list[Example]) -> None:
    """Writes ``examples`` (those with a non-empty answer carry the field)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_line(e, bool(e.answer)) + "\n" for e in examples),
                    encoding="utf-8")


def _examples(n: int, tag: str = "") -> list[Example]:
    return [Example(prompt=f"{tag}q{i}: ünï {i * 7}?", response=f"{tag}r{i}\nline {i}",
                    answer=str(i) if i % 3 == 0 else "") for i in range(n)]


# ---------------------------------------------------------------- JSON lines


def test_jsonl_single_file_is_split_90_5_5_in_order(tmp_path):
    examples = _examples(40)
    # Characters only in the test split (never in the char vocab), and one only in an answer.
    examples[39] = Example("¿test only?", "¡sí!", "")
    examples[0] = Example(examples[0].prompt, examples[0].response, "§0")
    lines = [_line(e, bool(e.answer)) for e in examples]
    lines.insert(10, "")  # blank lines are skipped
    lines.insert(20, "   \t")
    path = tmp_path / "examples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    builder = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert conditional.is_conditional(builder)
    assert builder.info.disable_shuffling
    assert set(builder.info.splits.keys()) == {"train", "validation", "test"}
    assert 40 * 90 // 100 == 36 and 40 * 95 // 100 == 38
    expected = {"train": examples[:36], "validation": examples[36:38], "test": examples[38:]}
    for split, want in expected.items():
        assert _records(builder, split) == want
    # An object without 'answer' reads as "".
    assert _records(builder, "train")[1] == Example(examples[1].prompt, examples[1].response, "")

    train = expected["train"]
    vocab = sorted(set("".join(e.prompt + e.response + e.answer for e in train)))
    assert builders.char_vocab(builder) == vocab
    assert "§" in vocab and "¿" not in vocab and "¡" not in vocab
    assert builders.char_vocab(builder) == sorted(set(builders.char_vocab(builder)))

    # Preparing again reuses the prepared dataset (same config, same records).
    again = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert again.builder_config.name == builder.builder_config.name
    assert _records(again, "test") == expected["test"]


def test_jsonl_folder_with_split_files_uses_them(tmp_path):
    folder = tmp_path / "splits"
    files = {"train": _examples(5, "tr"), "validation": _examples(2, "va"),
             "test": _examples(3, "te")}
    for split, examples in files.items():
        _write_jsonl(folder / f"{split}.jsonl", examples)
    _write_jsonl(folder / "extra.jsonl", _examples(4, "ex"))  # ignored: train.jsonl is there
    _write_jsonl(folder / "sub" / "more.jsonl", _examples(4, "mo"))

    builder = builders.prepare_builder(_config(tmp_path, path=str(folder)))
    assert set(builder.info.splits.keys()) == set(files)
    for split, want in files.items():
        assert _records(builder, split) == want
    assert builders.char_vocab(builder) == sorted(
        set("".join(e.prompt + e.response + e.answer for e in files["train"])))

    # Editing a split file makes a new dataset; editing a file that is not read does not.
    name = builder.builder_config.name
    _write_jsonl(folder / "extra.jsonl", _examples(6, "ex"))
    assert builders.prepare_builder(
        _config(tmp_path, path=str(folder))).builder_config.name == name
    _write_jsonl(folder / "test.jsonl", _examples(4, "te2"))
    edited = builders.prepare_builder(_config(tmp_path, path=str(folder)))
    assert edited.builder_config.name != name
    assert _records(edited, "test") == _examples(4, "te2")

    # Only the files present become splits.
    partial = tmp_path / "partial"
    _write_jsonl(partial / "train.jsonl", files["train"])
    _write_jsonl(partial / "test.jsonl", files["test"])
    builder = builders.prepare_builder(_config(tmp_path, path=str(partial)))
    assert set(builder.info.splits.keys()) == {"train", "test"}
    assert _records(builder, "train") == files["train"]
    assert _records(builder, "test") == files["test"]


def test_jsonl_path_to_a_train_file_is_split_90_5_5(tmp_path):
    folder = tmp_path / "splits"
    examples = _examples(20)
    _write_jsonl(folder / "train.jsonl", examples)
    _write_jsonl(folder / "test.jsonl", _examples(3, "te"))
    builder = builders.prepare_builder(_config(tmp_path, path=str(folder / "train.jsonl")))
    assert _records(builder, "train") == examples[:18]
    assert _records(builder, "validation") == examples[18:19]
    assert _records(builder, "test") == examples[19:]


def test_jsonl_folder_without_train_file_is_concatenated_by_relative_path(tmp_path):
    folder = tmp_path / "many"
    # Sorted by relative path as a string: 'a.jsonl' < 'a/10.jsonl' < 'a/2.jsonl' < 'b.jsonl'
    # < 'c/d/e.jsonl' ('.' sorts before '/', and '10' before '2').
    parts = {"c/d/e.jsonl": _examples(3, "E"), "b.jsonl": _examples(4, "B"),
             "a/2.jsonl": _examples(5, "A2"), "a/10.jsonl": _examples(4, "A10"),
             "a.jsonl": _examples(4, "A")}
    for name, examples in parts.items():
        _write_jsonl(folder / name, examples)
    (folder / "notes.txt").write_text('not {"json"} at all\n')  # not a .jsonl file: ignored
    order = ["a.jsonl", "a/10.jsonl", "a/2.jsonl", "b.jsonl", "c/d/e.jsonl"]
    examples = [e for name in order for e in parts[name]]
    assert len(examples) == 20

    builder = builders.prepare_builder(_config(tmp_path, path=str(folder)))
    assert _records(builder, "train") == examples[:18]
    assert _records(builder, "validation") == examples[18:19]
    assert _records(builder, "test") == examples[19:]


@pytest.mark.parametrize("n, train_end, validation_end", [
    (20, 18, 19), (47, 42, 44), (63, 56, 59), (100, 90, 95), (119, 107, 113)])
def test_jsonl_split_boundaries(tmp_path, n, train_end, validation_end):
    assert (n * 90 // 100, n * 95 // 100) == (train_end, validation_end)
    examples = _examples(n)
    path = tmp_path / f"n{n}.jsonl"
    _write_jsonl(path, examples)
    builder = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert _records(builder, "train") == examples[:train_end]
    assert _records(builder, "validation") == examples[train_end:validation_end]
    assert _records(builder, "test") == examples[validation_end:]


def _good_lines(n: int) -> list[str]:
    return [_line(e, True) for e in _examples(n)]


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ("{'prompt': 'a', 'response': 'b'}", "invalid JSON"),
    ('{"response": "r"}', "missing field 'prompt'"),
    ('{"prompt": "p"}', "missing field 'response'"),
    ('{"prompt": "p", "answer": "a"}', "missing field 'response'"),
    ('{"prompt": "p", "response": ""}', "field 'response' is empty"),
    ('{"prompt": 3, "response": "r"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "p", "response": ["r"]}', "field 'response' must be a string, got list"),
    ('{"prompt": "p", "response": "r", "answer": 5}', "field 'answer' must be a string, got int"),
    ('{"prompt": "p", "response": "r", "answer": null}',
     "field 'answer' must be a string, got NoneType"),
    ('["p", "r"]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    lines = _good_lines(30)
    lines[3:3] = ["", bad]  # the bad line is line 5 (line 4 is blank)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path.resolve()}:5: {message}")):
        builders.prepare_builder(_config(tmp_path, path=str(path)))


def test_jsonl_bad_line_in_a_later_file_names_that_file(tmp_path):
    folder = tmp_path / "folder"
    _write_jsonl(folder / "a.jsonl", _examples(30))
    (folder / "b.jsonl").write_text(_good_lines(1)[0] + '\n{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(
            f"{(folder / 'b.jsonl').resolve()}:2: missing field 'response'")):
        builders.prepare_builder(_config(tmp_path, path=str(folder)))


def test_jsonl_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [line.encode() for line in _good_lines(30)]
    lines[1] = '{"prompt": "caf\u00e9", "response": "r"}'.encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=re.escape(f"{path.resolve()}:2 is not valid UTF-8")):
        builders.prepare_builder(_config(tmp_path, path=str(path)))


def test_jsonl_too_few_examples(tmp_path):
    path = tmp_path / "five.jsonl"
    _write_jsonl(path, _examples(5))  # 5 * 90 // 100 == 5 * 95 // 100 == 4
    with pytest.raises(ValueError, match=re.escape(
            f"{path.resolve()} is too small: split 'validation' would be empty "
            "(5 examples in all)")):
        builders.prepare_builder(_config(tmp_path, path=str(path)))

    empty = tmp_path / "blank.jsonl"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is too small: split 'train' would be empty"):
        builders.prepare_builder(_config(tmp_path, path=str(empty)))

    folder = tmp_path / "splits"
    _write_jsonl(folder / "train.jsonl", _examples(3))
    (folder / "validation.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(
            f"{(folder / 'validation.jsonl').resolve()} has no examples (split 'validation')")):
        builders.prepare_builder(_config(tmp_path, path=str(folder)))


def test_jsonl_bad_path(tmp_path):
    with pytest.raises(ValueError, match="data.path is empty"):
        builders.prepare_builder(_config(tmp_path, path=""))
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.path: {missing} does not exist")):
        builders.prepare_builder(_config(tmp_path, path=str(missing)))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n")
    (folder / "b.json").write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(ValueError, match=re.escape(
            f"data.path: folder {folder.resolve()} contains no .jsonl files")):
        builders.prepare_builder(_config(tmp_path, path=str(folder)))


def test_jsonl_changed_file_is_a_new_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    first = _examples(20, "v1")
    _write_jsonl(path, first)
    old = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert _records(old, "test") == first[19:]

    second = _examples(40, "v2")  # a different size
    _write_jsonl(path, second)
    new = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert new.builder_config.name != old.builder_config.name
    assert _records(new, "train") == second[:36]
    assert _records(new, "test") == second[38:]

    # A new size with the old modification time: also a new dataset.
    stat = path.stat()
    fourth = _examples(41, "v4")
    _write_jsonl(path, fourth)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    resized = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert resized.builder_config.name not in (old.builder_config.name, new.builder_config.name)
    assert _records(resized, "test") == fourth[38:]
    _write_jsonl(path, second)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert builders.prepare_builder(
        _config(tmp_path, path=str(path))).builder_config.name == new.builder_config.name

    # Same size, new modification time: also a new dataset.
    third = _examples(40, "v3")
    assert len(path.read_bytes()) == len("".join(_line(e, bool(e.answer)) + "\n"
                                                 for e in third).encode())
    stat = path.stat()
    _write_jsonl(path, third)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    newer = builders.prepare_builder(_config(tmp_path, path=str(path)))
    assert newer.builder_config.name not in (old.builder_config.name, new.builder_config.name)
    assert _records(newer, "train") == third[:36]


# ---------------------------------------------------------------- GSM8K


def _gsm8k_line(question: str, solution: str) -> str:
    return json.dumps({"question": question, "answer": solution})


def _gsm8k_solutions(n: int, tag: str) -> list[tuple[str, str]]:
    return [(f"{tag} question {i}: how much is 2*{i}?",
             f"Two times {i} is <<2*{i}={2 * i}>>{2 * i}.\n#### {2 * i}") for i in range(n)]


def test_gsm8k_offline_from_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    train = _gsm8k_solutions(40, "train")
    train[5] = ("A big one?", "It is <<1000+234=1234>>1234.\n#### 1,234")
    train[39] = ("A price?", "It costs 3.50 dollars.\n#### 3.50.")
    test = _gsm8k_solutions(6, "test")
    (manual / "train.jsonl").write_text("\n".join(_gsm8k_line(*qa) for qa in train) + "\n")
    (manual / "test.jsonl").write_text("".join(_gsm8k_line(*qa) + "\n" for qa in test))
    # Independent expectations of the answer extraction.
    assert tasks.gsm8k_answer(train[5][1]) == "1234"
    assert tasks.gsm8k_answer(train[39][1]) == "3.5"
    assert tasks.gsm8k_answer(train[7][1]) == "14"

    builder = builders.prepare_builder(_config(tmp_path, name="gsm8k", manual_dir=str(manual)))
    assert conditional.is_conditional(builder)

    def expected(pairs):
        return [Example(q, s, tasks.gsm8k_answer(s)) for q, s in pairs]

    assert 40 * 95 // 100 == 38
    assert _records(builder, "train") == expected(train[:38])
    assert _records(builder, "validation") == expected(train[38:])
    assert _records(builder, "test") == expected(test)
    assert _records(builder, "train")[5].answer == "1234"
    assert _records(builder, "validation")[1].answer == "3.5"
    assert builders.char_vocab(builder) == sorted(
        set("".join(q + s + tasks.gsm8k_answer(s) for q, s in train[:38])))


def test_gsm8k_bad_files(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    lines = [_gsm8k_line(*qa) for qa in _gsm8k_solutions(40, "train")]
    lines[6] = _gsm8k_line("No final answer?", "It is 12.")
    (manual / "train.jsonl").write_text("\n".join(lines) + "\n")
    (manual / "test.jsonl").write_text(_gsm8k_line(*_gsm8k_solutions(1, "test")[0]) + "\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{manual.resolve() / 'train.jsonl'}:7: field 'answer' has no final answer")):
        builders.prepare_builder(_config(tmp_path, name="gsm8k", manual_dir=str(manual),
                                         data_dir=str(tmp_path / "tfds1")))

    lines[6] = json.dumps({"answer": "x\n#### 3"})
    (manual / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{manual.resolve() / 'train.jsonl'}:7: missing field 'question'")):
        builders.prepare_builder(_config(tmp_path, name="gsm8k", manual_dir=str(manual),
                                         data_dir=str(tmp_path / "tfds2")))

    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text(_gsm8k_line(*_gsm8k_solutions(1, "t")[0]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"has \['train.jsonl'\] but not \['test.jsonl'\]"):
        builders.prepare_builder(_config(tmp_path, name="gsm8k", manual_dir=str(only_train),
                                         data_dir=str(tmp_path / "tfds3")))


# ---------------------------------------------------------------- generated tasks


def _task_config(tmp_path, data_dir="tfds", **kwargs):
    settings = {"name": "task", "task": "addition", "task_examples": (50, 10, 10),
                "data_dir": str(tmp_path / data_dir)}
    return _config(tmp_path, **{**settings, **kwargs})


def test_task_builder_matches_the_task(tmp_path):
    builder = builders.prepare_builder(_task_config(tmp_path, data_dir="a"))
    assert conditional.is_conditional(builder)
    task = tasks.make_task("addition")
    expected = {split: task.examples(split, count, 0)
                for split, count in zip(("train", "validation", "test"), (50, 10, 10))}
    assert {split: len(e) for split, e in expected.items()} == {
        "train": 50, "validation": 10, "test": 10}
    records = {split: _records(builder, split) for split in expected}
    assert records == expected
    assert not {e.prompt for e in records["train"]} & {e.prompt for e in records["test"]}
    assert not {e.prompt for e in records["train"]} & {e.prompt for e in records["validation"]}
    for e in records["train"]:
        a, b = e.prompt.removesuffix("=").split("+")
        assert e.response == e.answer == str(int(a) + int(b))
    assert builders.char_vocab(builder) == sorted(
        set("".join(e.prompt + e.response + e.answer for e in expected["train"])))

    # Deterministic: another data_dir prepares the same config and records.
    other = builders.prepare_builder(_task_config(tmp_path, data_dir="b"))
    assert other.builder_config.name == builder.builder_config.name
    assert {split: _records(other, split) for split in expected} == expected

    # Another seed: another dataset, other examples.
    seeded = builders.prepare_builder(_task_config(tmp_path, data_dir="a", task_seed=1))
    assert seeded.builder_config.name != builder.builder_config.name
    assert _records(seeded, "train") == task.examples("train", 50, 1)
    assert _records(seeded, "train") != expected["train"]

    # Options are part of the config too.
    small = builders.prepare_builder(_task_config(tmp_path, data_dir="a",
                                                  task_options={"max_digits": 2}))
    assert small.builder_config.name not in (builder.builder_config.name,
                                             seeded.builder_config.name)
    assert small.builder_config.options == {"min_digits": 1, "max_digits": 2}  # resolved
    assert _records(small, "test") == tasks.make_task("addition", max_digits=2).examples(
        "test", 10, 0)
    assert all(len(part) <= 2 for e in _records(small, "train")
               for part in e.prompt.removesuffix("=").split("+"))

    # And so are the counts.
    fewer = builders.prepare_builder(_task_config(tmp_path, data_dir="a",
                                                  task_examples=(20, 10, 10)))
    assert fewer.builder_config.name != builder.builder_config.name
    assert _records(fewer, "train") == expected["train"][:20]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"task": ""}, ValueError, r"data\.task is empty"),
    ({"task": "no_such_task"}, ValueError,
     r"data\.task / data\.task_options: task='no_such_task'; allowed values: .*addition"),
    ({"task": "gsm8k"}, ValueError, r"data\.task='gsm8k' is a verifier of file-based data"),
    ({"task_options": {"bogus": 1}}, ValueError,
     r"data\.task / data\.task_options: task 'addition' has no option 'bogus'"),
    ({"task_options": {"max_digits": 0}}, ValueError, r"option max_digits must be an integer"),
    ({"task_examples": (1, 2)}, ValueError, r"data\.task_examples must be three positive"),
    ({"task_examples": (0, 1, 1)}, ValueError, r"data\.task_examples must be three positive"),
    ({"task_examples": (5, -1, 1)}, ValueError, r"data\.task_examples must be three positive"),
    ({"task_examples": (5, 1.5, 1)}, ValueError, r"data\.task_examples must be three positive"),
    ({"task_examples": (5, True, 1)}, ValueError, r"data\.task_examples must be three positive"),
])
def test_task_builder_bad_settings(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        builders.prepare_builder(_task_config(tmp_path, **kwargs))
    assert not (tmp_path / "tfds" / "task").exists()  # rejected before preparing anything


# ---------------------------------------------------------------- pipeline


def test_pipeline_on_jsonl(tmp_path):
    examples = _examples(40)
    path = tmp_path / "examples.jsonl"
    _write_jsonl(path, examples)
    config = _pipeline_config(tmp_path, path=str(path))
    corpus = pipeline.load_corpus(config)
    assert corpus.conditional
    tok = corpus.tokenizer
    assert tok.name == "char"
    assert tok.chars == sorted(set("".join(e.prompt + e.response + e.answer
                                           for e in examples[:36])))
    assert pipeline.examples(corpus, "test") == examples[38:]
    assert pipeline.examples(corpus, "validation") == examples[36:38]
    assert pipeline.examples(corpus, "train") == examples[:36]

    source = pipeline.sequences(config, corpus, "train")
    assert isinstance(source, sft.PromptResponseSequences)
    assert len(source) == 36
    for index in (0, 35):
        example = examples[index]
        prompt, response = tok.encode(example.prompt), tok.encode(example.response)
        assert tok.unk_id not in prompt and tok.unk_id not in response
        row = source[index]
        tokens = row["tokens"]
        assert tokens.shape == (64,) and tokens.dtype == np.int32
        p, r = len(prompt), len(response)
        assert tokens[0] == tok.bos_id
        np.testing.assert_array_equal(tokens[1:1 + p], prompt)
        assert tokens[1 + p] == tok.sep_id == tok.bos_id
        np.testing.assert_array_equal(tokens[2 + p:2 + p + r], response)
        assert (tokens[2 + p + r:] == tok.eos_id).all()  # EOS, then the EOS fill
        assert tok.decode(tokens) == ("<bos>" + example.prompt + "<bos>" + example.response
                                      + "<eos>" * (64 - p - r - 2))
        np.testing.assert_array_equal(row["prompt_mask"], np.arange(64) < p + 2)
        np.testing.assert_array_equal(row["loss_mask"], np.arange(64) >= p + 2)
        assert row["valid"].all()

    padded = pipeline.sequences(_pipeline_config(tmp_path, path=str(path), fill="pad"),
                                corpus, "validation")
    example = examples[36]
    p, r = len(example.prompt), len(example.response)
    tokens = padded[0]["tokens"]
    assert tokens[p + r + 2] == tok.eos_id
    assert (tokens[p + r + 3:] == tok.pad_id).all()
    np.testing.assert_array_equal(padded[0]["valid"], np.arange(64) < p + r + 3)

    with pytest.raises(ValueError, match="longer than data.seq_len=10"):
        pipeline.sequences(_pipeline_config(tmp_path, path=str(path), seq_len=10),
                           corpus, "train")


def test_pipeline_on_text_is_not_conditional(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some plain text, not prompt/response examples\n" * 20)
    config = _pipeline_config(tmp_path, name="text_files", path=str(path))
    corpus = pipeline.load_corpus(config)
    assert not corpus.conditional
    assert not conditional.is_conditional(corpus.builder)
    with pytest.raises(ValueError, match="holds text, not prompt/response examples"):
        pipeline.examples(corpus, "train")


def test_sft_names_every_prompt_response_builder():
    """`sft.CONDITIONAL_DATA` (read where tfds is not imported) lists exactly these builders."""
    names = {name for name, cls in builders.BUILDERS.items()
             if issubclass(cls, conditional._ConditionalBuilder)}
    assert names == set(sft.CONDITIONAL_DATA)
