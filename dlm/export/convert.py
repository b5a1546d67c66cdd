"""Flax parameters <-> exported tensors, and an export folder back into a dlm network (JAX).

`export_params` writes a folder that `load_export` reads back into the same Flax module and
parameter tree, so the logits are bit-identical; layout.py defines the names and shapes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np

import dlm
from dlm.data import sft, tokenizers
from dlm.diffusion import process as process_lib
from dlm.export import hf, layout
from dlm.models import registry as model_registry

_ARCHITECTURE_OF = {"dit": "dit", "transformer": "transformer"}
_PROCESS_KEYS = ("schedule", "schedule_eps", "schedule_power", "t_min", "num_timesteps",
                 "clip_min", "clip_max")


def model_section(model_config, vocab_size: int) -> dict:
    """config.json's "model": the architecture that the tensor names and shapes follow."""
    if model_config.name not in _ARCHITECTURE_OF:
        raise ValueError(f"model.name={model_config.name!r} cannot be exported; exportable: "
                         f"{', '.join(_ARCHITECTURE_OF)}")
    section = {
        "architecture": _ARCHITECTURE_OF[model_config.name],
        "hidden": int(model_config.hidden),
        "layers": int(model_config.layers),
        "heads": int(model_config.heads),
        "kv_heads": int(model_config.get("kv_heads") or model_config.heads),
        "mlp_ratio": int(model_config.mlp_ratio),
        "cond_dim": int(model_config.get("cond_dim", 128)),
        "vocab_size": int(vocab_size),
        "time_conditioning": bool(model_config.get("time_conditioning", False)),
        "mask": str(model_config.mask),
        "time_frequency_dim": layout.TIME_FREQUENCY_DIM,
        "time_max_period": layout.TIME_MAX_PERIOD,
        "dtype": "float32",
        "compute_dtype": str(model_config.get("dtype", "float32")),
        "max_len": int(model_config.get("max_len", 1024)),
    }
    options = {key: model_config.get(key, default)
               for key, default in layout.ARCH_DEFAULTS.items()}
    section.update(layout.arch({**section, **options}))
    section["activation"] = "gelu_tanh" if section["mlp"] == "gelu" else "swiglu_silu"
    return section


def process_section(config, vocab_size: int) -> dict:
    """config.json's "process": its name, mask id, block size (BD3-LM) and noise schedule."""
    name = config.process.name
    kind = _exportable(name, "process.name").network_kind
    section = {"name": name, "block_size": None,
               "mask_id": process_lib.mask_id_of(config, int(vocab_size))}
    if kind == "block":
        size = config.get("block_size", None) or config.process.get("block_size", None)
        section["block_size"] = int(size)
        # Training runs x_t ⊕ x_0 under bd3lm:b; sampling runs blocks under block_causal:b.
        section["training_mask"] = f"bd3lm:{int(size)}"
        section["sampling_mask"] = f"block_causal:{int(size)}"
    if kind != "causal":
        section.update({key: config.process.get(key) for key in _PROCESS_KEYS
                        if config.process.get(key) is not None})
        section["time_input"] = "diffusion time t in [0, 1]; read only when time_conditioning"
    return section


def _exportable(name: str, key: str) -> type[process_lib.Process]:
    """The registered process class `name` when it is exportable; ValueError otherwise."""
    exportable = [n for n, cls in process_lib.PROCESSES.items() if cls.exportable]
    if name not in exportable:
        raise ValueError(f"{key}={name!r} cannot be exported; allowed: {', '.join(exportable)}")
    return process_lib.PROCESSES.get(name)


def tokenizer_section(tokenizer: tokenizers.Tokenizer | None) -> dict | None:
    if tokenizer is None:
        return None
    return {"kind": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "mask_id": tokenizer.mask_id, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "file": f"{layout.TOKENIZER_DIR}/{tokenizers.TOKENIZER_FILE}"}


def to_tensors(params, model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Flax parameter tree as float32 numpy tensors under their export names."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    table = layout.parameter_table(model)
    missing = [path for _, path, _, _ in table if path not in flat]
    if missing or len(flat) != len(table):
        extra = sorted("/".join(p) for p in set(flat) - {path for _, path, _, _ in table})
        raise ValueError(f"the parameter tree does not match model {model}: missing "
                         f"{['/'.join(p) for p in missing][:6]}, unexpected {extra[:6]}")
    tensors = {}
    for name, path, transposed, _ in table:
        value = np.asarray(flat[path], np.float32)
        tensors[name] = value.T if transposed else value
    layout.check_tensors(tensors, model, "the parameter tree")
    return tensors


def from_tensors(tensors: Mapping[str, np.ndarray], model: Mapping[str, Any],
                 source: str = "the tensors"):
    """The Flax parameter tree (float32 jax arrays) of tensors under their export names."""
    layout.check_tensors(tensors, model, source)
    flat = {}
    for name, path, transposed, _ in layout.parameter_table(model):
        value = np.asarray(tensors[name], np.float32)
        flat[path] = jnp.asarray(value.T if transposed else value)
    return flax.traverse_util.unflatten_dict(flat)


def export_config(config, vocab_size: int, tokenizer: tokenizers.Tokenizer | None,
                  source: Mapping[str, Any] | None = None) -> dict:
    """The whole config.json of an export of the run whose dlm config is `config`."""
    return {
        "format": layout.FORMAT,
        "version": layout.VERSION,
        "model": model_section(config.model, vocab_size),
        "process": process_section(config, vocab_size),
        "tokenizer": tokenizer_section(tokenizer),
        "seq_len": int(config.data.seq_len),
        "source": {"dlm_version": dlm.__version__, **(source or {})},
        "dlm_config": json.loads(config.to_json_best_effort()),
    }


def export_params(out, params, export: Mapping[str, Any],
                  tokenizer: tokenizers.Tokenizer | None) -> pathlib.Path:
    """Writes config.json, model.safetensors and the tokenizer into the folder `out`."""
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_tensors(params, export["model"])
    layout.write_safetensors(out / layout.WEIGHTS_FILE, tensors,
                             {"dlm_export_version": str(layout.VERSION),
                              "architecture": export["model"]["architecture"]})
    layout.write_config(out, export)
    if tokenizer is not None:
        tokenizer.save(out / layout.TOKENIZER_DIR)
    return out


def copy_torch_reference(out) -> pathlib.Path:
    """Copies the standalone PyTorch reference (torch_reference.py) into `out/dlm_torch.py`."""
    target = pathlib.Path(out) / "dlm_torch.py"
    shutil.copyfile(pathlib.Path(__file__).with_name("torch_reference.py"), target)
    return target


@dataclasses.dataclass(frozen=True)
class Exported:
    """An export folder loaded into dlm: everything needed to score or sample with it."""

    export: dict  # config.json
    config: Any  # ml_collections.ConfigDict: the dlm run config the network was built from
    module: Any  # flax.linen.Module
    params: Any
    tokenizer: tokenizers.Tokenizer | None
    process: Any

    def network(self):
        """The sampling-engine network (`dlm.sampling.from_flax`); needs the tokenizer's
        special ids."""
        from dlm import sampling

        if self.tokenizer is None:
            raise ValueError("this export has no tokenizer; the samplers need one")
        return sampling.from_flax(self.module, self.process, self.tokenizer,
                                  context_len=int(self.config.data.seq_len),
                                  pad_unattended=sft.pad_unattended(self.config.data))


def run_config(export: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The dlm run config of an export: its saved one (or the defaults of its process) with
    the architecture of config.json's "model" section."""
    from configs import common

    model, process = export["model"], export.get("process") or {}
    name = process.get("name", "mdlm" if model["architecture"] == "dit" else "ar")
    process_class = _exportable(name, "config.json: process.name")
    if model["architecture"] not in process_class.models:
        raise ValueError(f"config.json: process {name!r} does not go with architecture "
                         f"{model['architecture']!r}")
    if export.get("dlm_config"):
        config = ml_collections.ConfigDict(export["dlm_config"])
    else:
        config = common.base_config(name, model["architecture"], "micro")
        config.process.update({k: process[k] for k in _PROCESS_KEYS if k in process})
        if process.get("mask_id", model["vocab_size"] - 1) != model["vocab_size"] - 1:
            config.process.mask_id = int(process["mask_id"])
        config.data.seq_len = int(export.get("seq_len") or model.get("max_len", 1024))
    config.model.update({
        "name": model["architecture"], "hidden": model["hidden"], "layers": model["layers"],
        "heads": model["heads"], "kv_heads": model["kv_heads"],
        "mlp_ratio": model["mlp_ratio"], "cond_dim": model["cond_dim"],
        "time_conditioning": bool(model.get("time_conditioning", False)),
        "attention_impl": "xla", **layout.arch(model)})
    if "mask" in model:
        config.model.mask = model["mask"]
    if process_class.network_kind == "block":
        config.block_size = int(process["block_size"])
    config.model.vocab_size = model["vocab_size"]
    return config


def load_export(directory) -> Exported:
    """An export folder (config.json, model.safetensors, tokenizer/) as a dlm network whose
    logits equal those of the exported run. Raises FileNotFoundError / ValueError naming the
    file, key or tensor that is missing or disagrees."""
    directory = pathlib.Path(directory).expanduser()
    if (directory / hf.EXPORT_FILE).is_file():  # a --format=hf folder
        export, tensors = hf.read_hf(directory)
        weights_file = directory / hf.HF_WEIGHTS_FILE
    else:
        export = layout.read_config(directory)
        tensors = layout.read_weights(directory, export)
        weights_file = directory / layout.WEIGHTS_FILE
    config = run_config(export)
    vocab_size = export["model"]["vocab_size"]
    tokenizer = None
    if (directory / layout.TOKENIZER_DIR / tokenizers.TOKENIZER_FILE).is_file():
        tokenizer = tokenizers.load_tokenizer(directory / layout.TOKENIZER_DIR)
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(f"{directory / layout.TOKENIZER_DIR}: the tokenizer has "
                             f"{tokenizer.vocab_size} ids but config.json's model.vocab_size "
                             f"is {vocab_size}")
    module = model_registry.build_model(config.model, vocab_size)
    params = from_tensors(tensors, export["model"], str(weights_file))
    process = process_lib.make_process(config, vocab_size=vocab_size)
    return Exported(export, config, module, params, tokenizer, process)
