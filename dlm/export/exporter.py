"""Exporting a trained run (`experiments.export`) and importing MDLM weights.

`export_workdir` loads a run's checkpoint the way evaluation does (EMA weights unless told
otherwise) and writes one of `FORMATS` into a folder:

- 'safetensors': config.json + model.safetensors + tokenizer/ (layout.py);
- 'torch': the same plus dlm_torch.py, the standalone PyTorch reference (torch_reference.py),
  checked against dlm's logits on a random batch;
- 'hf': a Hugging Face Starcoder2ForCausalLM folder (hf.py) for causal runs, checked the same
  way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dlm.export import convert, hf, layout, mdlm

FORMATS = ("safetensors", "torch", "hf")
PARITY_BATCH = 2
PARITY_MAX_LEN = 64


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")


def export_workdir(workdir, out, fmt: str = "safetensors", *, checkpoint_step: int | None = None,
                   use_ema: bool | None = None, verify: bool = True) -> dict:
    """Exports the run in `workdir` at `checkpoint_step` (default: latest) to the folder `out`.

    `use_ema` defaults to the run's `eval.use_ema` (EMA weights when the run kept them). With
    `verify`, the 'torch' and 'hf' formats are loaded back and run on a random batch beside
    dlm. Returns a summary: format, out, step, ema, parameters and, when verified, the max
    absolute and relative (to max |logit|) logit differences.
    """
    check_format(fmt)
    from dlm.runs import loading  # JAX-heavy: imported on use
    from dlm.runs import workdir as workdir_lib

    files = workdir_lib.read_run(workdir)
    export_probe = convert.export_config(files.config, files.tokenizer.vocab_size,
                                         files.tokenizer)
    unusual = layout.unusual_options(export_probe["model"])
    if fmt != "safetensors" and unusual:
        raise ValueError(f"--format={fmt} describes dlm's own networks; this one has "
                         f"{unusual}: use --format=safetensors")
    if fmt == "hf":
        hf.check_causal(export_probe)  # refuse before restoring the checkpoint
    try:
        run = loading.load_run(files, step=checkpoint_step, use_ema=use_ema)
    except ValueError as e:  # orbax: the saved tree or shapes differ from the config's model
        model = export_probe["model"]
        sizes = ", ".join(f"{k}={model[k]}" for k in ("architecture",) + layout.MODEL_KEYS)
        raise ValueError(f"{files.workdir}: the checkpoint does not match its config.json "
                         f"({sizes}): {str(e)[:2000]}") from None
    ema_used = (run.config.eval.get("use_ema", True) if use_ema is None else use_ema) and \
        float(run.config.optimizer.get("ema_decay", 0.0)) > 0
    params = jax.device_get(run.params)
    export = convert.export_config(
        run.config, run.tokenizer.vocab_size, run.tokenizer,
        source={"workdir": str(run.workdir), "step": run.step, "ema": bool(ema_used)})
    out = pathlib.Path(out).expanduser()
    tensors = convert.to_tensors(params, export["model"])
    if fmt == "hf":
        hf.save_hf(out, export, tensors, run.tokenizer)
    else:
        convert.export_params(out, params, export, run.tokenizer)
        if fmt == "torch":
            convert.copy_torch_reference(out)
    summary = {"format": fmt, "out": str(out), "step": run.step, "ema": bool(ema_used),
               "architecture": export["model"]["architecture"],
               "process": export["process"]["name"],
               "parameters": int(sum(t.size for t in tensors.values()))}
    if verify and fmt != "safetensors":
        summary.update(check_parity(out, fmt, run.module, params, export))
    return summary


def parity_inputs(export: Mapping[str, Any], seed: int = 0):
    """(tokens_BL int32, t_B float32) for comparing logits: random tokens over the whole
    vocabulary (mask id included) and times in (0, 1)."""
    model = export["model"]
    length = min(int(export.get("seq_len") or PARITY_MAX_LEN), PARITY_MAX_LEN)
    block = (export.get("process") or {}).get("block_size") or 1
    length = max(block, length - length % block)
    rng = np.random.default_rng(seed)
    tokens_BL = rng.integers(0, model["vocab_size"], (PARITY_BATCH, length)).astype(np.int32)
    t_B = rng.uniform(0.05, 0.95, PARITY_BATCH).astype(np.float32)
    return tokens_BL, t_B


def logit_errors(ours, theirs) -> dict:
    """max |a - b| and max |a - b| / max |b| of two logit arrays."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    abs_err = float(np.max(np.abs(ours - theirs)))
    return {"max_abs_error": abs_err,
            "max_rel_error": abs_err / max(float(np.max(np.abs(theirs))), 1e-30)}


def check_parity(out, fmt: str, module, params, export: Mapping[str, Any]) -> dict:
    """Runs the exported folder (torch reference or transformers) and dlm on one random batch;
    returns `logit_errors` of the exported model against dlm, and the mask used."""
    import torch

    tokens_BL, t_B = parity_inputs(export)
    # A block diffusion network is checked under the mask it samples with (block_causal:b).
    mask = (export.get("process") or {}).get("sampling_mask") if fmt == "torch" else None
    apply = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t, train=False, mask=mask))
    ours = np.asarray(apply(params, tokens_BL, t_B))
    with torch.no_grad():
        if fmt == "torch":
            from dlm.export import torch_reference

            model = torch_reference.load(out)
            theirs = model(torch.from_numpy(tokens_BL).long(), torch.from_numpy(t_B),
                           mask=mask).numpy()
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
            theirs = model(torch.from_numpy(tokens_BL).long()).logits.float().numpy()
    return {**logit_errors(theirs, ours), "parity_mask": mask or export["model"]["mask"]}


def import_mdlm(source, out, *, heads: int | None = None, seq_len: int = 1024,
                gpt2_dir=None) -> pathlib.Path:
    """Writes an export folder (config.json, model.safetensors) from MDLM or BD3-LM DiT weights.

    `source` is a safetensors file of an MDLM state dict, a mapping name -> array, or a
    Hugging Face folder of the public MDLM / BD3-LM checkpoints (its config.json gives the
    heads, the length and, for BD3-LM, the block size and clipped mask rates);
    `dlm.export.load_export(out)` then gives the dlm DiT. Raises ValueError on anything that
    does not map exactly (see mdlm.py). With `gpt2_dir` (GPT-2's encoder.json and
    vocab.bpe), GPT-2's tokenizer is saved beside as the public checkpoints use it: its 50257
    tokens, EOS as BOS and pad, and the mask as the last id (50257), so that the samplers run
    on the export.
    """
    block_size = clip = None
    if isinstance(source, Mapping):
        state, name = source, "the MDLM state dict"
    elif pathlib.Path(source).expanduser().is_dir():
        state, options = mdlm.read_hf_folder(source)
        name = str(source)
        heads = heads or options["heads"]
        seq_len, block_size, clip = options["seq_len"], options["block_size"], options["clip"]
    else:
        state, name = layout.read_safetensors(source), str(source)
    model, tensors = mdlm.from_state_dict(state, heads=heads, source=name)
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    layout.write_safetensors(out / layout.WEIGHTS_FILE, tensors,
                             {"dlm_export_version": str(layout.VERSION), "architecture": "dit"})
    export = mdlm.export_config(model, seq_len=seq_len, source=name, block_size=block_size,
                                clip=clip)
    if gpt2_dir is not None:
        from dlm.data import tokenizers

        gpt2 = tokenizers.GPT2Tokenizer(gpt2_dir)
        vocab = model["vocab_size"]
        if vocab != gpt2.eos_id + 2:
            raise ValueError(f"{name}'s embedding has {vocab} rows; GPT-2's {gpt2.eos_id + 1} "
                             f"tokens and a mask would be {gpt2.eos_id + 2}")
        tokenizer = tokenizers.PretrainedTokenizer(
            gpt2._hf, vocab_size=vocab, bos_id=gpt2.eos_id, eos_id=gpt2.eos_id,
            pad_id=gpt2.eos_id, mask_id=vocab - 1)
        tokenizer.save(out / layout.TOKENIZER_DIR)
        export["tokenizer"] = convert.tokenizer_section(tokenizer)
    layout.write_config(out, export)
    return out
