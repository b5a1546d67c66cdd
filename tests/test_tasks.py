"""Generated tasks: determinism, hash splits, self-consistency and exact verifiers."""

import functools
import itertools
import re

import pytest

from dlm.data import tasks
from dlm.data.tasks import Example, gsm8k_answer, make_task, split_of

GENERATED = ("addition", "multiplication", "sorting", "word_problems", "countdown", "sudoku")
FILE_BASED = ("exact_match", "gsm8k")
SPLIT_COUNTS = {"train": 300, "validation": 30, "test": 30}


@functools.cache
def _examples(name: str, split: str, seed: int = 0, **options) -> tuple[Example, ...]:
    return tuple(make_task(name, **options).examples(split, SPLIT_COUNTS[split], seed))


def test_registry_holds_every_task():
    assert set(tasks.TASKS.names()) == set(GENERATED + FILE_BASED)


@pytest.mark.parametrize("name", GENERATED)
def test_examples_are_deterministic_in_the_seed(name):
    task = make_task(name)
    first = task.examples("train", 50, seed=3)
    assert first == make_task(name).examples("train", 50, seed=3)
    assert first != task.examples("train", 50, seed=4)
    assert len({e.prompt for e in first}) == 50


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_disjoint_and_follow_split_of(name):
    prompts = {}
    for split in tasks.SPLITS:
        examples = _examples(name, split)
        prompts[split] = {e.prompt for e in examples}
        assert len(prompts[split]) == len(examples) == SPLIT_COUNTS[split]
        assert all(split_of(p) == split for p in prompts[split])
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]


@pytest.mark.parametrize("name", GENERATED)
def test_own_responses_are_correct(name):
    task = make_task(name)
    for example in _examples(name, "train"):
        assert task.is_correct(example, example.response), example
        if name != "countdown":  # its answer is the target, not an expression
            assert task.extract(example.response) == task.canonical(example.answer)


def test_split_of_is_a_90_5_5_hash_bucket():
    splits = [split_of(f"prompt {i}") for i in range(20_000)]
    assert splits == [split_of(f"prompt {i}") for i in range(20_000)]
    assert abs(splits.count("train") / 20_000 - 0.90) < 0.01
    assert abs(splits.count("validation") / 20_000 - 0.05) < 0.01
    assert abs(splits.count("test") / 20_000 - 0.05) < 0.01


def test_examples_reject_an_unknown_split():
    with pytest.raises(ValueError, match="split='dev'"):
        make_task("addition").examples("dev", 3, seed=0)


def test_examples_reject_a_bad_count():
    with pytest.raises(ValueError, match="count"):
        make_task("addition").examples("train", -1, seed=0)


def test_too_small_problem_space_raises():
    with pytest.raises(ValueError, match=r"addition\(min_digits=1, max_digits=1\).*'test'"):
        make_task("addition", max_digits=1).examples("test", 5000, seed=0)


# ---------------------------------------------------------------------------------------------
# Integer arithmetic and sorting.

@pytest.mark.parametrize("name, op", [("addition", "+"), ("multiplication", "*")])
def test_arithmetic_checks_the_exact_result(name, op):
    task = make_task(name)
    for example in _examples(name, "train")[:50]:
        a, b = map(int, example.prompt.removesuffix("=").split(op))
        assert example.answer == str(a + b if op == "+" else a * b)
        assert task.is_correct(example, f" {example.answer}\n")
        assert not task.is_correct(example, str(int(example.answer) + 1))
        assert not task.is_correct(example, example.answer + "a")
        assert not task.is_correct(example, "")
    example = Example("123+45=", "168", "168")
    assert make_task("addition").extract("0168") == "168"
    assert not make_task("addition").is_correct(example, "16 8")
    assert not make_task("addition").is_correct(example, "-168")


def test_digit_counts_stay_in_range():
    for example in _examples("multiplication", "train", min_digits=2, max_digits=3):
        assert all(2 <= len(x) <= 3 for x in example.prompt.removesuffix("=").split("*"))


def test_sorting_checks_the_ascending_order():
    task = make_task("sorting")
    example = Example("sort:5,3,9,1=", "1,3,5,9", "1,3,5,9")
    assert task.is_correct(example, "1, 3, 5, 9")
    for wrong in ("9,5,3,1", "1,3,5", "1,3,5,9,9", "1,3,5,8", "1,,3,5,9", "1;3;5;9", "", "a"):
        assert not task.is_correct(example, wrong), wrong
    for example in _examples("sorting", "train"):
        items = example.prompt.removeprefix("sort:").removesuffix("=").split(",")
        assert 3 <= len(items) <= 6 and all(0 <= int(x) <= 99 for x in items)
        assert example.answer == ",".join(map(str, sorted(map(int, items))))


# ---------------------------------------------------------------------------------------------
# Word problems and GSM8K answers.

def test_word_problem_solutions_are_true_short_chains():
    for example in _examples("word_problems", "train", min_steps=4, max_steps=4):
        assert len(example.prompt) <= 110, example.prompt
        *steps, final = example.response.split(" ")
        assert final == example.answer and steps[-1] == "####"
        value = None
        for step in steps[:-1]:
            a, op, b, c = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)\.", step).groups()
            assert value is None or int(a) == value
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(c) == expected and 1 <= int(c) < 1000
            assert op != "*" or b in ("2", "3")
            value = int(c)
        assert len(steps) - 1 == 4 and str(value) == example.answer


def test_word_problems_check_the_final_number():
    task = make_task("word_problems")
    example = Example("Ann has 5 pens. She buys 3. She sells 2. How many pens does Ann have?",
                      "5+3=8. 8-2=6. #### 6", "6")
    assert task.is_correct(example, "#### 6")
    assert task.is_correct(example, "5+3=8. 8-2=6. #### 6.0")
    for wrong in ("5+3=8. 8-2=6. #### 7", "5+3=8. 8-2=6.", "#### six", "6", ""):
        assert not task.is_correct(example, wrong), wrong


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("so 2+2=4\n#### 4", "4"),
    ("#### -5", "-5"),
    ("#### 3.50", "3.5"),
    ("#### 7.0", "7"),
    ("#### 8.", "8"),
    ("#### 3.50.", "3.5"),
    ("#### 8..", None),
    ("#### \u0663", None),
    ("#### 007", "7"),
    ("####   12  \n", "12"),
    ("#### 3 #### 4", "4"),
    ("#### 9 apples", "9"),
    ("no marker 5", None),
    ("#### abc", None),
    ("####", None),
    ("#### 4 ####", None),
    ("", None),
])
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_gsm8k_compares_canonical_numbers():
    task = make_task("gsm8k")
    assert task.is_correct(Example("q", "... #### 1234", "1,234"), "so #### 1234")
    assert task.is_correct(Example("q", "... #### 3.5"), "#### 3.50")
    assert task.is_correct(Example("q", "", "#### 72"), "it is\n#### 72")
    assert not task.is_correct(Example("q", "", "72"), "#### 73")
    assert not task.is_correct(Example("q", "", "72"), "72")


def test_exact_match_compares_stripped_text():
    task = make_task("exact_match")
    assert task.is_correct(Example("q", "ignored", " Paris "), "Paris\n")
    assert task.is_correct(Example("q", " Paris"), "Paris")
    assert not task.is_correct(Example("q", "Paris"), "paris")


@pytest.mark.parametrize("name", FILE_BASED)
def test_file_based_tasks_do_not_generate(name):
    with pytest.raises(NotImplementedError, match="file-based"):
        make_task(name).examples("train", 1, seed=0)


# ---------------------------------------------------------------------------------------------
# Countdown.

def test_countdown_accepts_any_exact_expression_using_each_number_once():
    task = make_task("countdown")
    example = Example("use 3,7,12 to make 33=", "3*7+12", "33")
    for right in ("3*7+12", "12+7*3", " (7*3)+12 ", "((3))*7+12", "12 + 3 * 7"):
        assert task.is_correct(example, right), right
    wrong = ("3*7+12+3",   # 3 reused
             "3*7+11",     # 11 is not given
             "3*7",        # 12 missing
             "3*7-12",     # wrong value
             "3*(7+", "3*7+12)", "3 7 12", "3*7+12=33", "x*7+12", "", "   ",
             "__import__('os')", "-3*7+12", "3**7+12", "3*7+12.0", "\u0663*7+12")
    for text in wrong:
        assert not task.is_correct(example, text), text
    assert task.extract("3*(7+") is None and task.extract(" 3*7+12 ") == "3*7+12"


def test_countdown_division_is_exact_and_by_zero_is_wrong():
    task = make_task("countdown")
    assert task.is_correct(Example("use 2,2,5 to make 20=", "2*2*5", "20"), "5*(2+2)")
    assert task.is_correct(Example("use 1,2,3 to make 1=", "3/(1+2)", "1"), "(1+2)/3")
    assert task.is_correct(Example("use 2,3,4 to make 6=", "4*3/2", "6"), "3/2*4")
    assert not task.is_correct(Example("use 2,2,5 to make 5=", "5*2/2", "5"), "5/(2-2)")
    assert not task.is_correct(Example("use 2,3,4 to make 6=", "4*3/2", "6"), "3/(2*4)")


def test_countdown_parser_survives_hostile_text():
    task = make_task("countdown")
    example = Example("use 3,7,12 to make 33=", "3*7+12", "33")
    for text in ("(" * 5000 + "3" + ")" * 5000, "(" * 99 + "3" + ")" * 99, "1+" * 5000 + "1",
                 "\x00", "3*7+12\n#", "3*7+12;"):
        assert not task.is_correct(example, text)


def test_countdown_examples_respect_the_options():
    for example in _examples("countdown", "train", num_numbers=4, max_number=9, max_target=50):
        numbers = re.fullmatch(r"use ([\d,]+) to make (\d+)=", example.prompt).group(1)
        values = [int(n) for n in numbers.split(",")]
        assert len(values) == 4 and values == sorted(values) and max(values) <= 9
        assert 1 <= int(example.answer) <= 50


# ---------------------------------------------------------------------------------------------
# Sudoku.

@functools.cache
def _all_4x4_grids() -> tuple[str, ...]:
    """Every complete 4x4 sudoku (288 of them), by brute force over rows."""
    rows = list(itertools.permutations("1234"))
    grids = []
    for grid in itertools.product(rows, repeat=4):
        cols_ok = all(len(set(col)) == 4 for col in zip(*grid))
        boxes_ok = all(len({grid[r + i][c + j] for i in (0, 1) for j in (0, 1)}) == 4
                       for r in (0, 2) for c in (0, 2))
        if cols_ok and boxes_ok:
            grids.append("/".join("".join(row) for row in grid))
    return tuple(grids)


def _completions(prompt: str) -> list[str]:
    givens = prompt.removesuffix("=")
    return [g for g in _all_4x4_grids()
            if all(p in (".", x) for p, x in zip(givens, g))]


def test_4x4_puzzles_have_exactly_one_solution():
    assert len(_all_4x4_grids()) == 288
    for split in tasks.SPLITS:
        for example in _examples("sudoku", split):
            assert example.prompt.count(".") == 8
            assert _completions(example.prompt) == [example.response]


def test_sudoku_rejects_invalid_or_unfaithful_grids():
    task = make_task("sudoku")
    example = _examples("sudoku", "train")[0]
    rows = example.response.split("/")
    assert task.is_correct(example, " / ".join(rows) + "\n")
    swapped = "/".join([rows[0][1] + rows[0][0] + rows[0][2:]] + rows[1:])
    other = next(g for g in _all_4x4_grids() if g != example.response)
    for wrong in (swapped, other, "/".join(rows[:3]), "/".join(rows) + "/", "", "abcd",
                  example.response.replace(example.response[0], "0"),
                  example.prompt.removesuffix("=")):
        assert not task.is_correct(example, wrong), wrong


def test_9x9_puzzles_are_solved_by_their_responses():
    task = make_task("sudoku", size=9)
    for example in task.examples("train", 5, seed=0):
        assert example.prompt.count(".") == 45 and len(example.prompt) == 90
        assert task.is_correct(example, example.response)
        assert tasks._count_solutions(
            [0 if c == "." else int(c) for c in example.prompt[:-1].replace("/", "")], 9) == 1
        rows = example.response.split("/")
        assert not task.is_correct(example, "/".join(rows[1:] + rows[:1]))


def test_sudoku_holes_default_by_size_and_are_bounded():
    assert make_task("sudoku").holes == 8 and make_task("sudoku", size=9).holes == 45
    assert make_task("sudoku") == make_task("sudoku", holes=8)
    assert make_task("sudoku", holes=0).examples("train", 1, seed=0)[0].prompt.count(".") == 0
    reached = make_task("sudoku", holes=12).examples("train", 20, seed=0)
    assert all(11 <= e.prompt.count(".") <= 12 and len(_completions(e.prompt)) == 1
               for e in reached)
    with pytest.raises(ValueError, match="holes"):
        make_task("sudoku", holes=13)
    with pytest.raises(ValueError, match="size"):
        make_task("sudoku", size=5)


# ---------------------------------------------------------------------------------------------
# make_task.

def test_make_task_names_what_is_wrong():
    with pytest.raises(ValueError, match="task='nope'; allowed values: addition"):
        make_task("nope")
    with pytest.raises(ValueError, match="no option 'digits'; its options: min_digits, "
                                         "max_digits"):
        make_task("addition", digits=3)
    with pytest.raises(ValueError, match="no option 'size'; its options: none"):
        make_task("gsm8k", size=3)
    for name, options, option in [("addition", {"max_digits": 0}, "max_digits"),
                                  ("addition", {"min_digits": "2"}, "min_digits"),
                                  ("sorting", {"min_items": 5, "max_items": 4}, "max_items"),
                                  ("sorting", {"max_value": -1}, "max_value"),
                                  ("word_problems", {"min_steps": 0}, "min_steps"),
                                  ("countdown", {"num_numbers": 5}, "num_numbers"),
                                  ("countdown", {"num_numbers": True}, "num_numbers"),
                                  ("countdown", {"max_target": 0}, "max_target")]:
        with pytest.raises(ValueError, match=f"option {option} "):
            make_task(name, **options)
