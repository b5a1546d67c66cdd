"""TFDS builders over prompt/response examples, written as array_record, read without TensorFlow.

Every builder yields ``{'prompt': str, 'response': str, 'answer': str, 'example': int64}``
records IN ORDER (shuffling is disabled, so record i of a split is the split's i-th
example, and ``example == i``). ``answer`` is the short final answer used for exact-match
scoring ("" when there is none). Records are never cut: one record is one example.

Each builder stores the sorted distinct characters of its TRAINING split's prompts,
responses and answers in the dataset metadata, so ``builders.char_vocab(builder)`` works
for character-level tokenizers. ``is_conditional(builder)`` tells these builders apart
from the text builders of ``dlm.data.builders``.

Split rules:
  jsonl: a folder holding ``train.jsonl`` uses it (and ``validation.jsonl`` /
    ``test.jsonl`` when present) as the splits. Otherwise the single file, or every
    *.jsonl file of the folder (recursive, sorted by relative path), is concatenated and
    split by example index: 'train' = the first ``n * 90 // 100`` examples, 'validation'
    = the next ones up to ``n * 95 // 100``, 'test' = the rest.
  gsm8k: GSM8K has no validation split. 'validation' = the last 5% of the official
    train file (examples from ``n * 95 // 100`` on), 'train' = the rest of it, 'test' =
    the official test file (1319 examples).
  task: ``dlm.data.tasks.make_task(task, **options).examples(split, count, seed)`` for
    each split's count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dlm.data import tasks, tfds_base

SPLITS = tasks.SPLITS
DEFAULT_TASK_EXAMPLES = (20_000, 500, 500)
GSM8K_VALIDATION_PERCENT = 5


def _builders():
    """Returns ``dlm.data.builders``, imported on use: it imports this module for BUILDERS."""
    from dlm.data import builders

    return builders


def is_conditional(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether the builder's records are prompt/response examples (have a 'prompt')."""
    return "prompt" in builder.info.features


def record_example(record) -> tasks.Example:
    """Returns the Example of one record read from ``builder.as_data_source()[split]``."""
    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return tasks.Example(prompt=text(record["prompt"]), response=text(record["response"]),
                         answer=text(record["answer"]))


def _slug(text: str, default: str) -> str:
    """Returns ``text`` lower-cased with runs of other characters as '_' (40 at most)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or default


def _digest(value) -> str:
    """Returns a short stable hash of a JSON-serialisable value."""
    encoded = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]


class _ConditionalBuilder(tfds_base.Builder, skip_registration=True):
    """Base of the prompt/response builders: one record per example."""

    FEATURES = {
        "prompt": tfds.features.Text(),
        "response": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "example": tfds.features.Scalar(dtype=np.int64),
    }

    def _generate_examples(self, examples: Iterable[tasks.Example], split: str):
        """Yields (record index, record) over the examples, in order."""
        chars, index = set(), 0
        for index, example in enumerate(examples, start=1):
            if split == "train":
                chars.update(example.prompt, example.response, example.answer)
            yield index - 1, {"prompt": example.prompt, "response": example.response,
                              "answer": example.answer, "example": index - 1}
        if index == 0:
            raise ValueError(f"{self.name}: split {split!r} has no examples")
        if split == "train":
            self._record_char_vocab(chars)


# ---------------------------------------------------------------- JSON lines


def _json_lines(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    """Yields ('file:line', object) for each non-blank line of a JSON-lines file."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        source = f"{path}:{number}"
        line = _builders().decode_utf8(raw, source)
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(value).__name__}")
        yield source, value


def _field(value: dict, key: str, source: str, default: str | None = None) -> str:
    """Returns the string field ``key`` of a JSON object; required unless a default is given."""
    if key not in value:
        if default is not None:
            return default
        raise ValueError(f"{source}: missing field {key!r}")
    if not isinstance(value[key], str):
        raise ValueError(f"{source}: field {key!r} must be a string, "
                         f"got {type(value[key]).__name__}")
    return value[key]


def _prompt_response(source: str, value: dict) -> tasks.Example:
    """Returns the Example of one {'prompt', 'response', 'answer'?} object."""
    example = tasks.Example(prompt=_field(value, "prompt", source),
                            response=_field(value, "response", source),
                            answer=_field(value, "answer", source, default=""))
    if not example.response:
        raise ValueError(f"{source}: field 'response' is empty")
    return example


def _read_prompt_responses(files: list[pathlib.Path]) -> list[tasks.Example]:
    return [_prompt_response(source, value) for path in files
            for source, value in _json_lines(path)]


def _explicit_splits(root: pathlib.Path) -> dict[str, pathlib.Path] | None:
    """Returns {split: file} when ``root`` is a folder holding train.jsonl, else None."""
    if not (root.is_dir() and (root / "train.jsonl").is_file()):
        return None
    return {split: root / f"{split}.jsonl" for split in SPLITS
            if (root / f"{split}.jsonl").is_file()}


def _jsonl_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Returns the files read for ``root``: the split files, [root] for a file, or the
    folder's *.jsonl files (recursive) sorted by relative path."""
    explicit = _explicit_splits(root)
    if explicit is not None:
        return list(explicit.values())
    if root.is_file():
        return [root]
    files = sorted((p for p in root.rglob("*.jsonl") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"data.path: folder {root} contains no .jsonl files")
    return files


def _jsonl_config(path) -> tfds.core.BuilderConfig:
    """Returns the config of a local JSON-lines dataset; its name hashes the path and its
    files' sizes and modification times (as the text builders' ``_local_config`` does)."""
    if not path:
        raise ValueError("data.path is empty: set it to a .jsonl file or a folder of them")
    resolved = pathlib.Path(path).expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"data.path: {resolved} does not exist")
    files = _jsonl_files(resolved)
    root = resolved if resolved.is_dir() else resolved.parent
    stats = [(f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)
             for f, st in ((f, f.stat()) for f in files)]
    return _builders().LocalCorpusConfig(
        name=f"{_slug(resolved.name, 'examples')}_{_digest([str(resolved), stats])}",
        path=str(resolved), description=f"local prompt/response examples {resolved}")


def _ninety_five_five(examples: list, source: str) -> dict[str, list]:
    """Returns {'train', 'validation', 'test'}: the examples cut at n*90//100, n*95//100."""
    n = len(examples)
    train_end, validation_end = n * 90 // 100, n * 95 // 100
    splits = {"train": examples[:train_end], "validation": examples[train_end:validation_end],
              "test": examples[validation_end:]}
    _check_splits(source, splits)
    return splits


def _check_splits(source: str, splits: dict[str, list]) -> None:
    for split, examples in splits.items():
        if not examples:
            raise ValueError(f"{source} is too small: split {split!r} would be empty "
                             f"({sum(len(e) for e in splits.values())} examples in all)")


class PromptResponseFiles(_ConditionalBuilder):
    """Local JSON-lines files of {"prompt": str, "response": str, "answer": str (optional)}.

    ``path`` is a file or a folder; see the module doc for how splits are chosen. Blank
    lines are skipped; any other bad line is a ValueError naming its file and line.
    """

    name = "jsonl"
    _DESCRIPTION = "Local prompt/response JSON lines; train/validation/test files or 90/5/5."

    def __init__(self, *, path=None, config=None, **kwargs):
        if config is None:
            config = _jsonl_config(path)
        super().__init__(config=config, **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        root = pathlib.Path(self.builder_config.path)
        explicit = _explicit_splits(root)
        if explicit is not None:
            splits = {split: _read_prompt_responses([file]) for split, file in explicit.items()}
            for split, file in explicit.items():
                if not splits[split]:
                    raise ValueError(f"{file} has no examples (split {split!r})")
        else:
            splits = _ninety_five_five(_read_prompt_responses(_jsonl_files(root)), str(root))
        return {split: self._generate_examples(examples, split)
                for split, examples in splits.items()}


# ---------------------------------------------------------------- GSM8K


def _gsm8k_example(source: str, value: dict) -> tasks.Example:
    """Returns the Example of one GSM8K {'question', 'answer'} object."""
    question = _field(value, "question", source)
    solution = _field(value, "answer", source)
    final = tasks.gsm8k_answer(solution)
    if final is None:
        raise ValueError(f"{source}: field 'answer' has no final answer ('#### <number>')")
    return tasks.Example(prompt=question, response=solution, answer=final)


class GSM8K(_ConditionalBuilder):
    """GSM8K grade-school math (OpenAI): prompt = question, response = the worked solution
    (with its <<calculator>> annotations, ending '#### N'), answer = N.

    GSM8K has no validation split: 'validation' is the last 5% of the official train file
    (from example ``n * 95 // 100`` on, 374 of 7473), 'train' the rest, 'test' the official
    test file.
    """

    name = "gsm8k"
    _BASE_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
                 "grade_school_math/data/")
    _FILES = ("train.jsonl", "test.jsonl")
    _DESCRIPTION = "GSM8K; validation = the last 5% of the official train file."
    _HOMEPAGE = "https://github.com/openai/grade-school-math"
    _CITATION = "Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put GSM8K's train.jsonl and test.jsonl in manual_dir."

    def _split_generators(self, dl_manager):
        files = self._files(dl_manager)
        official = {split: [_gsm8k_example(source, value)
                            for source, value in _json_lines(files[split])]
                    for split in ("train", "test")}
        n = len(official["train"])
        train_end = n * (100 - GSM8K_VALIDATION_PERCENT) // 100
        splits = {"train": official["train"][:train_end],
                  "validation": official["train"][train_end:], "test": official["test"]}
        _check_splits(f"gsm8k ({files['train']}, {files['test']})", splits)
        return {split: self._generate_examples(examples, split)
                for split, examples in splits.items()}

    def _files(self, dl_manager) -> dict[str, pathlib.Path]:
        """Returns {'train', 'test'}: the files in manual_dir, or the downloaded ones."""
        manual = _builders()._manual_dir(dl_manager)
        present = [name for name in self._FILES if manual and (manual / name).is_file()]
        if present and len(present) < len(self._FILES):
            missing = sorted(set(self._FILES) - set(present))
            raise FileNotFoundError(f"gsm8k: manual_dir {manual} has {present} but not {missing}")
        if present:
            return {name.split(".")[0]: manual / name for name in self._FILES}
        urls = {name.split(".")[0]: self._BASE_URL + name for name in self._FILES}
        return {split: pathlib.Path(p) for split, p in dl_manager.download(urls).items()}


# ---------------------------------------------------------------- generated tasks


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
    """A generated task; its name hashes every setting, so none share prepared data."""

    task: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    examples: tuple[int, int, int] = DEFAULT_TASK_EXAMPLES


def _plain(value):
    """Returns ``value`` with ConfigDicts as dicts and tuples as lists (JSON-like)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _task_counts(counts) -> tuple[int, int, int]:
    counts = tuple(counts)
    if len(counts) != 3 or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                   and c > 0 for c in counts):
        raise ValueError("data.task_examples must be three positive integers (train, "
                         f"validation, test), got {counts!r}")
    return tuple(int(c) for c in counts)


def _task_config(task: str, options, seed: int, counts) -> TaskConfig:
    """Returns the config of a generated task after checking its name and options."""
    if not task:
        raise ValueError(f"data.task is empty: with data.name='task' set it to one of "
                         f"{tuple(tasks.TASKS)}")
    counts = _task_counts(counts)
    # A ValueError now, not when preparing; the resolved options (defaults filled in) name
    # the data, so `{}` and the defaults spelled out share it.
    try:
        made = tasks.make_task(task, **_plain(options or {}))
    except ValueError as error:
        raise ValueError(f"data.task / data.task_options: {error}") from None
    if not tasks.is_generated(made):
        raise ValueError(f"data.task={task!r} is a verifier of file-based data, not a "
                         f"generated task; generated: {', '.join(tasks.generated_names())} "
                         "(for files use data.name='jsonl' or 'gsm8k')")
    options = _plain(made.options())
    settings = {"task": task, "options": options, "seed": int(seed), "examples": counts}
    return TaskConfig(name=f"{_slug(task, 'task')}_{_digest(settings)}", task=task,
                      options=options, seed=int(seed), examples=counts,
                      description=f"task {task} {json.dumps(settings, sort_keys=True)}")


class GeneratedTask(_ConditionalBuilder):
    """Examples of ``tasks.make_task(task, **options)``: ``examples(split, count, seed)``
    for the counts (train, validation, test)."""

    name = "task"
    _DESCRIPTION = "Examples of a dlm.data.tasks task (see the config's description)."

    def __init__(self, *, task: str = "", task_options=None, task_seed: int = 0,
                 task_examples=DEFAULT_TASK_EXAMPLES, config=None, **kwargs):
        if config is None:
            config = _task_config(task, task_options, task_seed, task_examples)
        super().__init__(config=config, **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        task = tasks.make_task(config.task, **config.options)
        return {split: self._generate_examples(task.examples(split, count, config.seed), split)
                for split, count in zip(SPLITS, config.examples)}
