"""Task evaluation: the sampler inputs' layout, batch invariance (greedy answers at batch 8
with mixed prompt lengths equal those at batch 1, row by row, for every deterministic
sampler), the summary's arithmetic, and experiments.evaluate_task end to end on tiny runs."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import small_config

from configs import ar, bd3lm, mdlm
from dlm import runs
from dlm.data import sft, tasks
from dlm.evaluation import answers
from dlm.runs import answering, loading
from dlm.runs.drawing import make_sampler
from dlm.training import trainer

SEQ_LEN = 24
TASK_DATA = {"data.name": "task", "data.task": "addition",
             "data.task_examples": (64, 16, 16), "data.seq_len": SEQ_LEN}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """{process: workdir} of tiny runs fine-tuned on addition for a few steps."""
    root = tmp_path_factory.mktemp("answers")
    out = {}
    for name, method in (("mdlm", mdlm), ("bd3lm", bd3lm), ("ar", ar)):
        config = small_config(root / "tfds", method, **TASK_DATA, total_steps=2,
                              checkpoint_every=2)
        if method is bd3lm:
            config.process.clip_search_widths = ()
        trainer.train(config, root / name)
        out[name] = root / name
    return out


def _perturbed(run):
    """The run with every weight moved at random: a few training steps leave DiT blocks
    close to the identity, so rows would hardly depend on their context."""
    leaves, tree = jax.tree.flatten(run.params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
    return dataclasses.replace(run, params=params)


def test_layout_right_of_each_prompt():
    layout = answers.Layout(length=10, max_new_tokens=4, fill_id=2, mask_id=9)
    tokens, known = layout.rows([np.array([1, 5, 1]), np.array([1, 5, 6, 7, 1])])
    np.testing.assert_array_equal(tokens, [[1, 5, 1, 9, 9, 9, 9, 2, 2, 2],
                                           [1, 5, 6, 7, 1, 9, 9, 9, 9, 2]])
    np.testing.assert_array_equal(~known, tokens == 9)


def test_a_prompt_that_leaves_no_room_is_named():
    tokenizer = _tokenizer()
    examples = [tasks.Example("1+1=", "2", "2"), tasks.Example("1+1=" * 10, "2", "2")]
    with pytest.raises(ValueError, match="example 1: its prompt is 42 tokens"):
        answers.encode_prompts(examples, tokenizer, 24)


def _tokenizer():
    from dlm.data.tokenizers import CharTokenizer

    return CharTokenizer(sorted("0123456789+="))


DETERMINISTIC = {
    "mdlm": [("llada", {"block_length": 8}), ("fast_dllm", {}), ("fast_dllm", {"factor": 1.0}),
             ("dream", {"temperature": 0.0}), ("mdlm", {"temperature": 0.0, "steps": 8})],
    "bd3lm": [("bd3lm", {"policy": "threshold", "temperature": 0.0}),
              ("bd3lm", {"policy": "fixed_count", "temperature": 0.0, "steps": 2})],
    "ar": [("ar", {"temperature": 0.0})],
}


@pytest.mark.parametrize("process", ["mdlm", "bd3lm", "ar"])
def test_greedy_answers_do_not_depend_on_the_batch(workdirs, process):
    run = _perturbed(loading.load_run(workdirs[process]))
    files = runs.read_run(workdirs[process])
    verifier = answering.make_verifier(files, None)
    examples = answering.task_examples(files, "test", 8)
    prompt_lengths = {len(e.prompt) for e in examples}
    assert len(prompt_lengths) > 1, "the batch must mix prompt lengths"
    for name, options in DETERMINISTIC[process]:
        # No EOS, so that every row decodes its whole budget (the fill stays EOS).
        sampler = make_sampler(name, overrides={**options, "suppress_eos": True})
        if name == "mdlm":  # MDLM reveals positions at random: the noise is per row
            continue
        together, _ = answering.answer_run(run, sampler, verifier, examples, batch_size=8)
        alone = [answering.answer_run(run, sampler, verifier, [e], batch_size=1)[0][0]
                 for e in examples]
        assert [r["response_ids"] for r in together] == [r["response_ids"] for r in alone], \
            (name, options)
        nfe_together, nfe_alone = ([r["nfe"] for r in rows] for rows in (together, alone))
        if name in ("bd3lm", "ar"):  # rows share the clock: a batch moves to the next block
            # (position) when all its rows are done with it
            assert all(a >= b for a, b in zip(nfe_together, nfe_alone)), (name, options)
        else:
            assert nfe_together == nfe_alone, (name, options)
        # Rows depend on their prompts.
        assert len({tuple(r["response_ids"]) for r in together}) > 1, (name, options)


def test_summary_arithmetic():
    rows = [{"correct": True, "nfe": 4, "answer_tokens": 4, "decoded_positions": 8},
            {"correct": False, "nfe": 2, "answer_tokens": 4, "decoded_positions": 8},
            {"correct": True, "nfe": 2, "answer_tokens": 8, "decoded_positions": 8},
            {"correct": True, "nfe": 8, "answer_tokens": 4, "decoded_positions": 8}]
    summary = answers.summarize(rows, "x", seconds=2.0, compile_seconds=1.0)
    assert summary["accuracy"] == 0.75
    assert summary["accuracy_stderr"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert summary["mean_nfe"] == 4.0
    assert summary["tokens_per_call"] == 20 / 16
    assert summary["positions_per_call"] == 32 / 16
    assert summary["tokens_per_second"] == 10.0


def test_rows_score_the_text_before_the_first_eos(workdirs):
    files = runs.read_run(workdirs["mdlm"])
    tok = files.tokenizer
    example = tasks.Example("12+30=", "42", "42")
    prompt = sft.encode_prompt(tok.encode(example.prompt), sft.Specials.of(tok))
    tokens = np.concatenate([prompt, tok.encode("42"), [tok.eos_id], tok.encode("7")])
    known = np.zeros(len(tokens), bool)
    known[:len(prompt)] = True
    row = answers._row(tasks.make_task("addition"), example, tok, tokens, known,
                       len(prompt), nfe=3, seconds=0.1, token_forwards=3 * len(tokens))
    assert (row["response"], row["extracted"], row["correct"]) == ("42", "42", True)
    assert row["answer_tokens"] == 3 and row["decoded_positions"] == 4
    summary = answers.summarize([row], "mdlm", 0.1, 0.0)
    assert summary["token_forwards_per_token"] == len(tokens)  # 3 plain calls, 3 tokens


def test_evaluate_task_command_line(workdirs, tmp_path):
    out = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate_task", f"--workdir={workdirs['mdlm']}",
         "--sampler=fast_dllm", "--sampler_config.threshold=0.7", "--num_examples=6",
         "--batch_size=4", f"--out={out}"],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["task"] == "addition" and summary["num_examples"] == 6
    assert summary["sampler"] == "fast_dllm"
    for key in ("accuracy", "accuracy_stderr", "mean_nfe", "tokens_per_call",
                "tokens_per_second", "seconds", "compile_seconds"):
        assert key in summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert summary["accuracy"] == np.mean([r["correct"] for r in rows])
    assert [r["prompt"] for r in rows] == [
        e.prompt for e in answering.task_examples(runs.read_run(workdirs["mdlm"]), "test", 6)]


@pytest.mark.parametrize("flags, message", [
    (["--sampler=ar"], "sampler 'ar'"),
    (["--sampler=fast_dllm", "--steps=4"], "no steps option"),
    (["--sampler=fast_dllm", "--num_examples=0"], "--num_examples=0 must be >= 1"),
    (["--sampler=fast_dllm", "--max_new_tokens=0"], "--max_new_tokens=0 must be >= 1"),
    (["--sampler=fast_dllm", "--task=nope"], "nope"),
])
def test_evaluate_task_bad_flags_are_one_line(workdirs, flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate_task", f"--workdir={workdirs['mdlm']}",
         *flags], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unconditional_runs_are_refused(tmp_path):
    config = small_config(tmp_path / "tfds", mdlm, total_steps=1)
    from helpers import save_run

    from dlm.data.tokenizers import CharTokenizer
    save_run(tmp_path / "run", config, CharTokenizer(sorted("abc \n")))
    with pytest.raises(ValueError, match="no prompts to answer"):
        answering.task_examples(runs.read_run(tmp_path / "run"), "test", 4)
