"""A run's workdir: what it holds and how its files are read and written.

    WORKDIR/config.json        the run config (ml_collections, as JSON)
    WORKDIR/tokenizer/         the tokenizer (`dlm.data.tokenizers`)
    WORKDIR/checkpoints/STEP/  orbax: `state` (the train state) and `data` (iterator positions)
    WORKDIR/metrics.jsonl      one JSON object per log or eval step (process 0)
    WORKDIR/rounds/NAME/       runs of their own kept by processes trained in rounds (SDTT)

Wherever a workdir is read (`read_run`, so sampling, task evaluation and the harness), a
pretrained Hugging Face folder (`dlm.runs.pretrained`: Llama, Qwen2, LLaDA, Dream) may
stand in for it: its config.json becomes a dlm run config, tokenizer.json its tokenizer,
and its weights are read from its safetensors instead of a checkpoint.
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
from dlm.runs import pretrained

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
    pretrained: Any = None  # a pretrained folder's `dlm.runs.pretrained.Folder`, else None

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
        if self.pretrained is not None:
            return {"kind": self.tokenizer.name, **self.tokenizer._state()}
        path = self.workdir / TOKENIZER_DIR / tokenizers.TOKENIZER_FILE
        return json.loads(path.read_text(encoding="utf-8"))


def read_run(workdir) -> RunFiles:
    """The config, tokenizer and process of the run in `workdir` (FileNotFoundError if a file
    is missing)."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    if pretrained.is_pretrained_folder(workdir):
        return read_pretrained(workdir)
    config = load_config(workdir)
    tokenizer = tokenizers.load_tokenizer(workdir / TOKENIZER_DIR)
    config.model.vocab_size = tokenizer.vocab_size
    return RunFiles(workdir, config, tokenizer,
                    process_lib.make_process(config, vocab_size=tokenizer.vocab_size))


# The length a pretrained run config records as data.seq_len, the default --length of
# sampling and task evaluation (LLaDA's published setting: a prompt and 256 answer positions),
# when the model's own context is longer; --length goes up to the model's context.
PRETRAINED_SEQ_LEN = 512


def pretrained_config(folder) -> ml_collections.ConfigDict:
    """The dlm run config of a read pretrained folder: its process ('ar' for causal LMs,
    'mdlm' with the model's mask id for LLaDA and Dream), its transformer, and as data.seq_len
    its context or `PRETRAINED_SEQ_LEN`, whichever is shorter."""
    from configs import common

    config = common.base_config(folder.family.process, "transformer", "micro")
    config.model = pretrained.model_config(folder)
    config.model.vocab_size = folder.model["vocab_size"]
    config.process.mask_id = -1 if folder.mask_id is None else folder.mask_id
    config.data.seq_len = min(int(folder.model["max_len"]), PRETRAINED_SEQ_LEN)
    config.optimizer.ema_decay = 0.0
    config.pretrained = str(folder.path)
    return config


def read_pretrained(path) -> RunFiles:
    """The RunFiles of a pretrained Hugging Face folder (see the module docstring)."""
    folder = pretrained.read_folder(path)
    tokenizer = pretrained.load_tokenizer(folder)
    config = pretrained_config(folder)
    return RunFiles(folder.path.resolve(), config, tokenizer,
                    process_lib.make_process(config, vocab_size=tokenizer.vocab_size),
                    pretrained=folder)
