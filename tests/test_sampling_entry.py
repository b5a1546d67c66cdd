"""experiments/sample.py on tiny saved runs: the JSON lines, the summary and the errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import save_run

from configs import ar as ar_config
from configs import mdlm as mdlm_config
from dlm import runs as runs_lib
from dlm.data.tokenizers import CharTokenizer
from experiments import cli, sample  # noqa: F401  (sample defines the flags)

SEQ_LEN = 16


def _save_run(workdir, config_module, text):
    """A run as training leaves it (config, tokenizer, one checkpoint), of a tiny network."""
    config = config_module.get_config("micro")
    config.model.update(hidden=32, layers=2, heads=2, kv_heads=2)
    config.data.seq_len = SEQ_LEN
    tokenizer = CharTokenizer.from_text(text)
    config.model.vocab_size = tokenizer.vocab_size
    save_run(workdir, config, tokenizer)
    return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = "abcdefgh \n"
    return {
        "mdlm": _save_run(root / "mdlm", mdlm_config, text),
        "ar": _save_run(root / "ar", ar_config, text),
        "ar_other_tokenizer": _save_run(root / "ar2", ar_config, "xyz"),
    }


def test_writes_one_record_per_sample_and_a_summary(runs, tmp_path):
    out = tmp_path / "samples.jsonl"
    # 9 samples in batches of 8, each split over the 8 test devices; the last one trimmed.
    summary = runs_lib.sample_to_file(runs["mdlm"], "fast_dllm", str(out), num_samples=9,
                                    length=12, prompt="abc", batch_size=8,
                                    judge_workdir=runs["ar"],
                                    overrides={"threshold": 0.5, "block_length": 4})
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 9
    for record in records:
        assert set(record) == {"text", "tokens", "prompt_tokens", "nfe", "token_forwards",
                               "seconds"}
        assert len(record["tokens"]) == 12 and record["tokens"][:3] == record["prompt_tokens"]
        assert record["text"].startswith("abc") and "[MASK]" not in record["text"]
        assert 1 <= record["nfe"] <= 9
        assert record["token_forwards"] == 12 * record["nfe"]  # a plain forward per call
    assert summary["sampler"] == "fast_dllm" and summary["num_samples"] == 9
    for key in ("tokens_per_second", "mean_nfe", "entropy", "gen_ppl", "compile_seconds"):
        assert np.isfinite(summary[key]) and summary[key] >= 0, key
    forwards = sum(r["token_forwards"] for r in records)
    assert summary["token_forwards_per_token"] == pytest.approx(forwards / (9 * 9))
    config = runs_lib.load_run(runs["mdlm"]).config.model
    assert summary["attention_flops_per_token"] == pytest.approx(
        4 * config.layers * config.hidden * 12 * forwards / 81)


def test_autoregressive_run_starts_from_bos(runs, tmp_path):
    out = tmp_path / "ar.jsonl"
    summary = runs_lib.sample_to_file(runs["ar"], "ar", str(out), num_samples=2, length=8,
                                    batch_size=2, overrides={"temperature": 0.0})
    record = json.loads(out.read_text().splitlines()[0])
    assert record["prompt_tokens"] == [CharTokenizer.from_text("abcdefgh \n").bos_id]
    assert record["nfe"] == summary["mean_nfe"] == 7


def test_clear_errors(runs, tmp_path):
    out = str(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="unknown sampler 'mdlmm'; known samplers: mdlm, "):
        runs_lib.sample_to_file(runs["mdlm"], "mdlmm", out, num_samples=1)
    with pytest.raises(ValueError, match="the prompt is 20 tokens long, more than --length=8"):
        runs_lib.sample_to_file(runs["mdlm"], "mdlm", out, num_samples=1, length=8,
                              prompt="a" * 20)
    with pytest.raises(ValueError, match="uses another tokenizer"):
        runs_lib.sample_to_file(runs["mdlm"], "mdlm", out, num_samples=1,
                              judge_workdir=runs["ar_other_tokenizer"])
    with pytest.raises(ValueError, match="cannot sample an autoregressive run"):
        runs_lib.sample_to_file(runs["ar"], "mdlm", out, num_samples=1)
    with pytest.raises(ValueError, match="has no steps option"):
        runs_lib.sample_to_file(runs["ar"], "ar", out, num_samples=1, steps=4)
    with pytest.raises(ValueError, match="has no option 'treshold'"):
        runs_lib.sample_to_file(runs["mdlm"], "fast_dllm", out, num_samples=1,
                              overrides={"treshold": 0.5})


def test_a_drafter_run_drafts_for_an_ar_run(runs, tmp_path):
    out = str(tmp_path / "spec.jsonl")
    options = dict(num_samples=2, length=12, prompt="abc", batch_size=2)
    spec = runs_lib.sample_to_file(runs["ar"], "diffuspec", out, drafter_workdir=runs["mdlm"],
                                   overrides={"temperature": 0.0, "draft_len": 3}, **options)
    greedy = runs_lib.sample_to_file(runs["ar"], "ar", str(tmp_path / "ar.jsonl"),
                                     overrides={"temperature": 0.0}, **options)
    texts = [[json.loads(line)["text"] for line in pathlib.Path(path).read_text().splitlines()]
             for path in (out, tmp_path / "ar.jsonl")]
    assert texts[0] == texts[1] and spec["num_samples"] == greedy["num_samples"] == 2
    with pytest.raises(ValueError, match="needs --drafter_workdir"):
        runs_lib.sample_to_file(runs["ar"], "diffuspec", out, **options)
    with pytest.raises(ValueError, match="--drafter_workdir is only for diffuspec, ar_guided"):
        runs_lib.sample_to_file(runs["ar"], "ar", out, drafter_workdir=runs["mdlm"], **options)
    with pytest.raises(ValueError, match="is not a masked diffusion run"):
        runs_lib.sample_to_file(runs["ar"], "diffuspec", out, drafter_workdir=runs["ar"],
                                **options)
    with pytest.raises(ValueError, match="another tokenizer"):
        runs_lib.sample_to_file(runs["ar_other_tokenizer"], "diffuspec", out,
                                drafter_workdir=runs["mdlm"], **options)


def test_sampler_config_flags():
    argv, overrides = cli.parse_flags([
        "sample", "--workdir=w", "--out=o", "--sampler_config.threshold=0.8",
        "--sampler_config.stop_at_eos=true", "--sampler_config.block_length=None",
        "--sampler_config.remasking=random"])
    assert argv == ["sample"]
    assert overrides == {"threshold": 0.8, "stop_at_eos": True, "block_length": None,
                         "remasking": "random"}


def test_command_line(runs, tmp_path):
    out = tmp_path / "cli.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={runs['mdlm']}",
         "--sampler=llada", "--num_samples=2", "--length=10", "--steps=5", "--prompt=ab",
         "--sampler_config.block_length=5", f"--out={out}"],
        capture_output=True, text=True, check=False, timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": "", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sampler"] == "llada" and summary["mean_nfe"] <= 5
    assert len(out.read_text().splitlines()) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={runs['mdlm']}",
         "--sampler=nope", f"--out={out}"], capture_output=True, text=True, check=False,
        timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert bad.returncode != 0 and "known samplers: mdlm" in bad.stderr


def test_print_samples(runs, capsys):
    texts = runs_lib.print_samples(runs["mdlm"], "mdlm", num_samples=2, length=8, steps=4)
    assert len(texts) == 2
    assert "sample 1" in capsys.readouterr().out
