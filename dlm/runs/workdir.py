"""A run's workdir: what it holds and how its files are read and written.

    WORKDIR/config.json        the run config (ml_collections, as JSON)
    WORKDIR/tokenizer/         the tokenizer (`dlm.data.tokenizers`)
    WORKDIR/checkpoints/STEP/  orbax: `state` (the train state) and `data` (iterator positions)
    WORKDIR/metrics.jsonl      one JSON object per log or eval step (process 0)
    WORKDIR/rounds/NAME/       runs of their own kept by processes trained in rounds (SDTT)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections

from dlm.data import tokenizers
from dlm.diffusion import process as process_lib

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
ROUNDS_DIR = "rounds"


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (FileNotFoundError if missing)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a dlm training workdir?")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if "vocab_size" in config.model:  # recorded for readers; the tokenizer decides it
        del config.model["vocab_size"]
    return config


def save_run_files(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                   workdir: pathlib.Path) -> None:
    """Writes the config and tokenizer beside the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    tokenizer.save(workdir / TOKENIZER_DIR)


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What a run's workdir says without loading weights: its config, tokenizer and process
    (`config.model.vocab_size` is set from the tokenizer)."""

    workdir: pathlib.Path
    config: Any  # ml_collections.ConfigDict
    tokenizer: tokenizers.Tokenizer
    process: Any  # dlm.diffusion.process.Process

    @property
    def network_kind(self) -> str:
        """How samplers see its network (`Process.network_kind`): 'denoiser', 'block',
        'causal' or 'energy'."""
        return self.process.network_kind

    @property
    def block_size(self) -> int | None:
        """The block size of a block diffusion run (None otherwise)."""
        return int(self.process.block_size) if self.network_kind == "block" else None

    def tokenizer_state(self) -> dict:
        """The saved tokenizer file's content, for comparing two runs' tokenizers."""
        path = self.workdir / TOKENIZER_DIR / tokenizers.TOKENIZER_FILE
        return json.loads(path.read_text(encoding="utf-8"))


def read_run(workdir) -> RunFiles:
    """The config, tokenizer and process of the run in `workdir` (FileNotFoundError if a file
    is missing)."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    config = load_config(workdir)
    tokenizer = tokenizers.load_tokenizer(workdir / TOKENIZER_DIR)
    config.model.vocab_size = tokenizer.vocab_size
    return RunFiles(workdir, config, tokenizer,
                    process_lib.make_process(config, vocab_size=tokenizer.vocab_size))
