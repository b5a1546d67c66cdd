"""Generated verifiable tasks for supervised fine-tuning: prompts, targets and exact checks.

A task makes `Example`s (a prompt, the response a model is trained on, and the canonical
answer) and checks a model's response text exactly. Generated tasks draw problems from a
seeded `random.Random`; file-based ones (`exact_match`, `gsm8k`) only verify.

    task = make_task("addition", max_digits=3)
    train = task.examples("train", 10_000, seed=0)
    task.is_correct(train[0], "168")

A prompt's split is a hash of its text (`split_of`, 90/5/5), never the draw order, so a
problem is in exactly one split whatever the seed, the count or the other options.
Everything is pure Python; the arithmetic of `countdown` uses its own parser, never eval.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import random
import re
from fractions import Fraction
from typing import ClassVar

from dlm.registry import Registry

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: ``prompt`` -> ``response`` (the training target; a worked solution for
    word problems), and ``answer``, the canonical string the verifier checks."""

    prompt: str
    response: str
    answer: str = ""


def split_of(prompt: str) -> str:
    """The split of a prompt: the first 8 bytes of its sha256 modulo 100, buckets
    [0, 90) -> 'train', [90, 95) -> 'validation', [95, 100) -> 'test'."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


class Task:
    """A family of problems with an exact verifier. Subclasses are frozen dataclasses whose
    fields are the task's options, validated in ``__post_init__``."""

    name: ClassVar[str]

    def generate(self, rng: random.Random) -> Example:
        """One random problem drawn from ``rng``."""
        raise NotImplementedError(f"task {self.name!r} is file-based: its examples come from a "
                                  "data file, not from generate()")

    def extract(self, text: str) -> str | None:
        """The canonical answer inside a response text; None if it is malformed or absent."""
        raise NotImplementedError

    def canonical(self, answer: str) -> str | None:
        """The canonical form of an example's ``answer`` (what ``extract`` returns for it)."""
        return self.extract(answer)

    def is_correct(self, example: Example, text: str) -> bool:
        """Whether ``text`` (a model's response to ``example.prompt``) answers it correctly."""
        got = self.extract(text)
        return got is not None and got == self.canonical(example.answer)

    def options(self) -> dict[str, object]:
        """The task's options, field name -> value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        """The task and its options, for error messages: ``addition(min_digits=1, ...)``."""
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({options})"

    def examples(self, split: str, count: int, seed: int) -> list[Example]:
        """``count`` distinct examples of ``split``, a function of (task, options, seed, split).

        Draws ``generate`` from ``random.Random(f"{seed}:{split}:{describe()}")`` and keeps
        the first ``count`` distinct prompts whose ``split_of`` is ``split``. Raises
        ValueError when ``50 * count + 1000`` draws do not find them: the problem space of
        these options is too small for the request.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer; got {count!r}")
        rng = random.Random(f"{seed}:{split}:{self.describe()}")
        draws = 50 * count + 1000
        found: dict[str, Example] = {}
        for _ in range(draws):
            if len(found) >= count:
                break
            example = self.generate(rng)
            if example.prompt not in found and split_of(example.prompt) == split:
                found[example.prompt] = example
        if len(found) < count:
            raise ValueError(f"task {self.describe()}: found {len(found)} distinct {split!r} "
                             f"examples in {draws} draws, {count} requested; the problem "
                             "space is too small for this request")
        return list(found.values())


TASKS: Registry[type[Task]] = Registry("task")


def is_generated(task: Task | type[Task]) -> bool:
    """Whether the task draws its own examples (`generate`), rather than verifying files'."""
    cls = task if isinstance(task, type) else type(task)
    return cls.generate is not Task.generate


def generated_names() -> list[str]:
    """The registered tasks that generate their examples."""
    return [name for name in TASKS if is_generated(TASKS.get(name))]


def default_options(name: str) -> dict:
    """The options of task ``name`` with their declared defaults (None where the task derives
    one from the other options, as sudoku's ``holes`` from its ``size``)."""
    return {f.name: f.default for f in dataclasses.fields(TASKS.get(name))}


def make_task(name: str, **options) -> Task:
    """The task registered as ``name`` with ``options``; ValueError for an unknown name (listing
    the allowed ones), an unknown option (listing the task's options) or a bad value."""
    cls = TASKS.get(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for option in options:
        if option not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ValueError(f"task {name!r} has no option {option!r}; its options: {listed}")
    return cls(**options)


def _check_int(task: Task, option: str, low: int, high: int | None = None) -> None:
    """Raises ValueError unless the option is an int in [low, high] (no bound when None)."""
    value = getattr(task, option)
    if (isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"task {task.name!r}: option {option} must be an integer {bound}; "
                         f"got {value!r}")


def _check_choice(task: Task, option: str, choices: tuple[int, ...]) -> None:
    """Raises ValueError unless the option is one of ``choices``."""
    value = getattr(task, option)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"task {task.name!r}: option {option} must be one of "
                         f"{', '.join(map(str, choices))}; got {value!r}")


# ---------------------------------------------------------------------------------------------
# Numbers.

_INT = re.compile(r"-?\d+", re.ASCII)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _canonical_int(text: str) -> str | None:
    """``str(int(text))`` for an optionally signed run of digits (whitespace around allowed):
    '0168' -> '168', '-0' -> '0'; None for anything else."""
    text = text.strip()
    return str(int(text)) if _INT.fullmatch(text) else None


def _canonical_number(text: str) -> str | None:
    """A decimal number with commas removed and no redundant zeros: '1,234' -> '1234',
    '3.50' -> '3.5', '2.0' -> '2', '-0' -> '0'; None if ``text`` is not a number."""
    text = text.strip().replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    whole, _, frac = text.lstrip("-").partition(".")
    body = whole.lstrip("0") or "0"
    if frac.rstrip("0"):
        body = f"{body}.{frac.rstrip('0')}"
    return body if body == "0" or not text.startswith("-") else "-" + body


def gsm8k_answer(text: str) -> str | None:
    """The GSM8K answer of a solution text: the number right after its last '####' (its first
    whitespace-separated token less one sentence-ending '.', commas removed, canonical as in
    ``_canonical_number``, so "#### 1,234" -> "1234" and "#### 3.50." -> "3.5"); None if there
    is no '####' or no number follows it."""
    _, marker, rest = text.rpartition("####")
    tokens = rest.split()
    return _canonical_number(tokens[0].removesuffix(".")) if marker and tokens else None


# ---------------------------------------------------------------------------------------------
# Arithmetic on integers.

def _random_operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A non-negative integer whose digit count is uniform in [min_digits, max_digits]."""
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


@dataclasses.dataclass(frozen=True)
class _BinaryArithmetic(Task):
    """``a<op>b=`` -> the exact result; the answer is an integer (leading zeros and
    surrounding whitespace in a response are forgiven)."""

    symbol: ClassVar[str]  # the operator, a key of _OPERATORS
    min_digits: int = 1
    max_digits: int = 3

    def __post_init__(self):
        _check_int(self, "min_digits", 1)
        _check_int(self, "max_digits", self.min_digits)

    def generate(self, rng: random.Random) -> Example:
        a = _random_operand(rng, self.min_digits, self.max_digits)
        b = _random_operand(rng, self.min_digits, self.max_digits)
        result = str(_OPERATORS[self.symbol](a, b))
        return Example(f"{a}{self.symbol}{b}=", result, result)

    def extract(self, text: str) -> str | None:
        return _canonical_int(text)


@TASKS.register("addition")
@dataclasses.dataclass(frozen=True)
class Addition(_BinaryArithmetic):
    """``123+45=`` -> ``168``."""

    name: ClassVar[str] = "addition"
    symbol: ClassVar[str] = "+"


@TASKS.register("multiplication")
@dataclasses.dataclass(frozen=True)
class Multiplication(_BinaryArithmetic):
    """``12*34=`` -> ``408``."""

    name: ClassVar[str] = "multiplication"
    symbol: ClassVar[str] = "*"
    max_digits: int = 2


@TASKS.register("sorting")
@dataclasses.dataclass(frozen=True)
class Sorting(Task):
    """``sort:5,3,9,1=`` -> ``1,3,5,9``: between min_items and max_items integers in
    [0, max_value] (repeats allowed), sorted ascending."""

    name: ClassVar[str] = "sorting"
    min_items: int = 3
    max_items: int = 6
    max_value: int = 99

    def __post_init__(self):
        _check_int(self, "min_items", 1)
        _check_int(self, "max_items", self.min_items)
        _check_int(self, "max_value", 0)

    def generate(self, rng: random.Random) -> Example:
        items = [rng.randint(0, self.max_value)
                 for _ in range(rng.randint(self.min_items, self.max_items))]
        answer = ",".join(map(str, sorted(items)))
        return Example(f"sort:{','.join(map(str, items))}=", answer, answer)

    def extract(self, text: str) -> str | None:
        """Comma-separated integers (spaces around them allowed) as ``1,3,5,9``."""
        items = [_canonical_int(item) for item in text.split(",")]
        return None if None in items else ",".join(items)


# ---------------------------------------------------------------------------------------------
# Word problems.

@dataclasses.dataclass(frozen=True)
class _Story:
    """Sentence templates of one kind of word problem, over the fields ``{who}`` and
    ``{pronoun}`` (a holder), ``{things}`` and ``{n}``; ``times`` maps a factor to its
    sentence."""

    opening: str
    plus: tuple[str, ...]
    minus: tuple[str, ...]
    times: dict[int, str]
    question: str
    holders: tuple[tuple[str, str], ...]  # (who, pronoun)
    things: tuple[str, ...]


# Four steps of either story take at most 110 characters.
_STORIES = (
    _Story(opening="{who} has {n} {things}.",
           plus=("{pronoun} buys {n}.", "{pronoun} gets {n}.", "{pronoun} finds {n}."),
           minus=("{pronoun} sells {n}.", "{pronoun} loses {n}.", "{pronoun} uses {n}."),
           times={2: "They double.", 3: "They triple."},
           question="How many {things} does {who} have?",
           holders=(("Ann", "She"), ("Sue", "She"), ("Eve", "She"), ("Amy", "She"),
                    ("Bob", "He"), ("Tom", "He"), ("Max", "He"), ("Sam", "He")),
           things=("pens", "cards", "cups", "bags", "mugs")),
    _Story(opening="A {who} has {n} {things}.",
           plus=("Add {n}.", "Put {n} in."),
           minus=("Take {n} out.", "Remove {n}."),
           times={2: "They double.", 3: "They triple."},
           question="How many {things} are in the {who}?",
           holders=(("box", ""), ("jar", ""), ("bag", ""), ("bowl", "")),
           things=("eggs", "coins", "beads", "nuts", "balls")),
)

_WORD_LIMIT = 1000  # every quantity of a word problem stays below this
_WORD_AMOUNT = 20   # starting values and added or removed amounts are at most this


@TASKS.register("word_problems")
@dataclasses.dataclass(frozen=True)
class WordProblems(Task):
    """Templated grade-school problems of min_steps..max_steps steps (+, -, and * by 2 or 3),
    e.g. "Ann has 5 pens. She buys 3. She sells 2. How many pens does Ann have?" ->
    "5+3=8. 8-2=6. #### 6". Every quantity is a positive integer below 1000, and the
    response is the chain of the prompt's steps, so it is predictable from the prompt. The
    answer is checked the GSM8K way (``gsm8k_answer``)."""

    name: ClassVar[str] = "word_problems"
    min_steps: int = 2
    max_steps: int = 4

    def __post_init__(self):
        _check_int(self, "min_steps", 1)
        _check_int(self, "max_steps", self.min_steps)

    def generate(self, rng: random.Random) -> Example:
        story = rng.choice(_STORIES)
        who, pronoun = rng.choice(story.holders)
        words = {"who": who, "pronoun": pronoun, "things": rng.choice(story.things)}
        value = rng.randint(2, _WORD_AMOUNT)
        sentences, work = [story.opening.format(n=value, **words)], []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            op, n, template = _word_step(rng, story, value)
            result = _OPERATORS[op](value, n)
            sentences.append(template.format(n=n, **words))
            work.append(f"{value}{op}{n}={result}.")
            value = result
        sentences.append(story.question.format(**words))
        return Example(" ".join(sentences), f"{' '.join(work)} #### {value}", str(value))

    def extract(self, text: str) -> str | None:
        return gsm8k_answer(text)

    def canonical(self, answer: str) -> str | None:
        return _canonical_number(answer)


def _word_step(rng: random.Random, story: _Story, value: int) -> tuple[str, int, str]:
    """One step on ``value``: (operator, operand, sentence template), keeping the result in
    [1, 1000). Adding and removing are twice as likely as multiplying."""
    ops = ["+", "+"] if value + 1 < _WORD_LIMIT else []
    ops += ["-", "-"] if value >= 2 else []
    factors = [k for k in story.times if value >= 2 and value * k < _WORD_LIMIT]
    ops += ["*"] if factors else []
    op = rng.choice(ops)
    if op == "+":
        n = rng.randint(1, min(_WORD_AMOUNT, _WORD_LIMIT - 1 - value))
        return "+", n, rng.choice(story.plus)
    if op == "-":
        return "-", rng.randint(1, min(_WORD_AMOUNT, value - 1)), rng.choice(story.minus)
    factor = rng.choice(factors)
    return "*", factor, story.times[factor]


# ---------------------------------------------------------------------------------------------
# Countdown: a safe parser and exact evaluation of + - * / ( ) expressions.

# An expression tree: an int leaf, or (operator, left, right).
Node = int | tuple[str, "Node", "Node"]

_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))", re.ASCII)
_MAX_EXPRESSION_CHARS = 200  # longer texts do not parse (bounds the parser's recursion)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _tokenize(text: str) -> list[str] | None:
    """Numbers and the characters ``+-*/()``, spaces between them ignored; None for any other
    character."""
    tokens, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            return None
        tokens.append(match.group(1) or match.group(2))
        pos = match.end()
    return tokens


class _Parser:
    """Recursive descent over ``expr := term (('+'|'-') term)*``,
    ``term := factor (('*'|'/') factor)*``, ``factor := number | '(' expr ')'``; operators
    are left-associative and there is no unary minus."""

    def __init__(self, tokens: list[str]):
        self._tokens, self._pos = tokens, 0

    def parse(self) -> Node | None:
        node = self._expr()
        return node if node is not None and self._pos == len(self._tokens) else None

    def _peek(self) -> str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _expr(self) -> Node | None:
        return self._chain(self._term, "+-")

    def _term(self) -> Node | None:
        return self._chain(self._factor, "*/")

    def _chain(self, operand, ops: str) -> Node | None:
        """``operand (op operand)*`` for op in ``ops``, folded to the left."""
        node = operand()
        while node is not None and self._peek() is not None and self._peek() in ops:
            op = self._tokens[self._pos]
            self._pos += 1
            right = operand()
            node = None if right is None else (op, node, right)
        return node

    def _factor(self) -> Node | None:
        token = self._peek()
        self._pos += 1
        if token is not None and token.isdigit():
            return int(token)
        if token != "(":
            return None
        node = self._expr()
        if node is None or self._peek() != ")":
            return None
        self._pos += 1
        return node


def parse_expression(text: str) -> Node | None:
    """The tree of an arithmetic expression over non-negative integers with + - * / and
    parentheses; None if ``text`` is not one (or is longer than 200 characters)."""
    if len(text) > _MAX_EXPRESSION_CHARS:
        return None
    tokens = _tokenize(text)
    return None if not tokens else _Parser(tokens).parse()


def evaluate(node: Node) -> Fraction:
    """The exact value of an expression tree; ZeroDivisionError on a division by zero."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    return _OPERATORS[op](evaluate(left), evaluate(right))


def _leaves(node: Node) -> list[int]:
    return [node] if isinstance(node, int) else _leaves(node[1]) + _leaves(node[2])


def _render(node: Node) -> str:
    """The expression with only the parentheses its tree needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node

    def operand(child: Node, is_right: bool) -> str:
        text = _render(child)
        if isinstance(child, int):
            return text
        inner, outer = _PRECEDENCE[child[0]], _PRECEDENCE[op]
        needs = inner < outer or (is_right and inner == outer and op in "-/")
        return f"({text})" if needs else text

    return f"{operand(left, False)}{op}{operand(right, True)}"


def _random_tree(rng: random.Random, leaves: list[int]) -> Node:
    """A uniform split point and operator at every node over ``leaves`` in order."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    return (rng.choice("+-*/"), _random_tree(rng, leaves[:cut]), _random_tree(rng, leaves[cut:]))


_COUNTDOWN_PROMPT = re.compile(r"use (\d+(?:,\d+)*) to make (\d+)=", re.ASCII)


@TASKS.register("countdown")
@dataclasses.dataclass(frozen=True)
class Countdown(Task):
    """``use 3,7,12 to make 33=`` -> ``3*7+12``: an expression with + - * / and parentheses
    that uses each listed number exactly once (the prompt lists them sorted) and equals the
    target exactly (rational arithmetic). Numbers are in [1, max_number], the target in
    [1, max_target]; any correct expression counts, not only the response."""

    name: ClassVar[str] = "countdown"
    num_numbers: int = 3
    max_number: int = 20
    max_target: int = 100

    def __post_init__(self):
        _check_choice(self, "num_numbers", (3, 4))
        _check_int(self, "max_number", 1)
        _check_int(self, "max_target", 1)

    def generate(self, rng: random.Random) -> Example:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            tree = _random_tree(rng, numbers)
            try:
                value = evaluate(tree)
            except ZeroDivisionError:
                continue
            if value.denominator == 1 and 1 <= value <= self.max_target:
                listed = ",".join(map(str, sorted(numbers)))
                return Example(f"use {listed} to make {value}=", _render(tree), str(value))

    def extract(self, text: str) -> str | None:
        """The stripped expression text, or None if it does not parse."""
        return text.strip() if parse_expression(text) is not None else None

    def is_correct(self, example: Example, text: str) -> bool:
        match = _COUNTDOWN_PROMPT.fullmatch(example.prompt)
        if match is None:
            raise ValueError(f"not a countdown prompt: {example.prompt!r}")
        tree = parse_expression(text)
        numbers = sorted(int(n) for n in match.group(1).split(","))
        if tree is None or sorted(_leaves(tree)) != numbers:
            return False
        try:
            return evaluate(tree) == int(example.answer)
        except ZeroDivisionError:
            return False


# ---------------------------------------------------------------------------------------------
# Sudoku.

_MIN_CLUES = {4: 4, 9: 17}  # the fewest givens of any uniquely solvable puzzle


def _full_grid(rng: random.Random, size: int) -> list[int]:
    """A random complete grid, row-major: the base pattern with shuffled bands, rows within
    bands, stacks, columns within stacks and digit labels, transposed half the time."""
    box = math.isqrt(size)

    def lines() -> list[int]:
        bands = rng.sample(range(box), box)
        return [band * box + line for band in bands for line in rng.sample(range(box), box)]

    rows, cols, digits = lines(), lines(), rng.sample(range(1, size + 1), size)
    if rng.random() < 0.5:
        rows, cols = cols, rows
    return [digits[(box * (r % box) + r // box + c) % size] for r in rows for c in cols]


def _count_solutions(cells: list[int], size: int, limit: int = 2) -> int:
    """The number of completions of a row-major grid (0 = hole), counting stops at ``limit``.
    Backtracking on the hole with the fewest candidates (digit sets as bitmasks)."""
    box = math.isqrt(size)
    cells = list(cells)
    units = [(i // size, size + i % size, 2 * size + (i // size // box) * box + i % size // box)
             for i in range(size * size)]
    used = [0] * (3 * size)
    for i, value in enumerate(cells):
        if value:
            bit = 1 << value
            if any(used[u] & bit for u in units[i]):
                return 0
            for u in units[i]:
                used[u] |= bit
    holes = [i for i, value in enumerate(cells) if not value]
    full = ((1 << size) - 1) << 1

    def search() -> int:
        best, best_free = -1, 0
        for i in holes:
            if not cells[i]:
                row, col, square = units[i]
                free = full & ~(used[row] | used[col] | used[square])
                if not free:
                    return 0
                if best < 0 or free.bit_count() < best_free.bit_count():
                    best, best_free = i, free
        if best < 0:
            return 1
        total = 0
        for value in range(1, size + 1):
            bit = 1 << value
            if best_free & bit:
                cells[best] = value
                for u in units[best]:
                    used[u] |= bit
                total += search()
                for u in units[best]:
                    used[u] &= ~bit
                cells[best] = 0
                if total >= limit:
                    break
        return total

    return search()


def _grid_text(cells: list[int], size: int) -> str:
    """Rows joined with '/', holes as '.'."""
    chars = [str(v) if v else "." for v in cells]
    return "/".join("".join(chars[r * size:(r + 1) * size]) for r in range(size))


def _is_valid_grid(cells: list[int], size: int) -> bool:
    """Whether a complete grid has every digit once in each row, column and box."""
    box, digits = math.isqrt(size), set(range(1, size + 1))
    rows = [cells[r * size:(r + 1) * size] for r in range(size)]
    cols = [cells[c::size] for c in range(size)]
    boxes = [[cells[(br + r) * size + bc + c] for r in range(box) for c in range(box)]
             for br in range(0, size, box) for bc in range(0, size, box)]
    return all(set(unit) == digits for unit in rows + cols + boxes)


@TASKS.register("sudoku")
@dataclasses.dataclass(frozen=True)
class Sudoku(Task):
    """``1.3./..2./..../4..1=`` -> ``1234/3412/2143/4321``: a size x size puzzle (4 or 9)
    with a unique solution, rows joined with '/' and holes as '.'.

    The generator empties the cells of a random full grid in random order, skipping any
    whose removal would allow a second solution, until ``holes`` cells are empty (default 8
    for size 4, 45 for size 9). When no remaining cell can be emptied the puzzle keeps fewer
    holes (the most this greedy removal reached): about one 4x4 puzzle in seven stops at 11
    of 12 holes, and 9x9 puzzles stop between about 55 and 58, though ``holes`` may be up to
    64 (17 givens). Any valid grid that keeps the prompt's givens is correct (it is the
    solution, which is unique).
    """

    name: ClassVar[str] = "sudoku"
    size: int = 4
    holes: int | None = None

    def __post_init__(self):
        _check_choice(self, "size", (4, 9))
        if self.holes is None:
            object.__setattr__(self, "holes", 8 if self.size == 4 else 45)
        _check_int(self, "holes", 0, self.size * self.size - _MIN_CLUES[self.size])

    def generate(self, rng: random.Random) -> Example:
        solution = _full_grid(rng, self.size)
        puzzle, emptied = list(solution), 0
        for i in rng.sample(range(len(puzzle)), len(puzzle)):
            if emptied == self.holes:
                break
            puzzle[i] = 0
            if _count_solutions(puzzle, self.size) == 1:
                emptied += 1
            else:
                puzzle[i] = solution[i]
        answer = _grid_text(solution, self.size)
        return Example(_grid_text(puzzle, self.size) + "=", answer, answer)

    def extract(self, text: str) -> str | None:
        """The grid with whitespace removed if it is ``size`` rows of ``size`` digits in
        [1, size] joined with '/'; None otherwise."""
        rows = "".join(text.split()).split("/")
        digits = set("123456789"[:self.size])
        if len(rows) != self.size or any(len(r) != self.size or set(r) - digits for r in rows):
            return None
        return "/".join(rows)

    def is_correct(self, example: Example, text: str) -> bool:
        grid = self.extract(text)
        if grid is None:
            return False
        cells = [int(c) for c in grid.replace("/", "")]
        givens = example.prompt.removesuffix("=").replace("/", "")
        return (_is_valid_grid(cells, self.size) and len(givens) == len(cells)
                and all(g in (".", str(v)) for g, v in zip(givens, cells)))


# ---------------------------------------------------------------------------------------------
# File-based tasks: verification of examples read from data files.

@TASKS.register("exact_match")
@dataclasses.dataclass(frozen=True)
class ExactMatch(Task):
    """The response must equal the answer (or, for an example without one, the reference
    response), both stripped of surrounding whitespace."""

    name: ClassVar[str] = "exact_match"

    def extract(self, text: str) -> str | None:
        return text.strip()

    def is_correct(self, example: Example, text: str) -> bool:
        return self.extract(text) == (example.answer or example.response).strip()


@TASKS.register("gsm8k")
@dataclasses.dataclass(frozen=True)
class GSM8K(Task):
    """GSM8K-style solutions ending in ``#### <number>``, compared as canonical numbers. The
    answer may be a bare number or a solution text; an example without one is checked
    against the number of its reference response."""

    name: ClassVar[str] = "gsm8k"

    def extract(self, text: str) -> str | None:
        return gsm8k_answer(text)

    def canonical(self, answer: str) -> str | None:
        return gsm8k_answer(answer) if "####" in answer else _canonical_number(answer)

    def is_correct(self, example: Example, text: str) -> bool:
        got = self.extract(text)
        return got is not None and got == self.canonical(example.answer or example.response)
