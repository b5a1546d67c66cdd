r"""Exports a trained run for other frameworks, or imports MDLM weights.

    python -m experiments.export --workdir=DIR --out=OUT [--format=safetensors|torch|hf] \
        [--checkpoint_step=N] [--use_ema=false] [--verify=false]
    python -m experiments.export --mdlm_weights=FILE.safetensors|HF_FOLDER --out=OUT [--heads=N] \
        [--gpt2_dir=DIR]

`safetensors`: OUT/config.json (architecture, process with its block size, tokenizer ids),
OUT/model.safetensors (PyTorch-style names) and OUT/tokenizer/; `dlm.export.load_export(OUT)`
loads it back. `torch`: the same plus OUT/dlm_torch.py, a standalone PyTorch reference of the
network. `hf`: a causal (AR) run as a transformers Starcoder2ForCausalLM folder with its
tokenizer. The EMA weights are exported when the run kept them (as evaluation uses them).
`torch` and `hf` are loaded back and compared with dlm on a random batch. Prints one JSON line.
"""

import json

from absl import app, flags

from dlm.export import exporter
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "The folder to write.")
_FORMAT = flags.DEFINE_string("format", "safetensors", f"One of {', '.join(exporter.FORMATS)}.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", None,
                             "Export the EMA weights (default: the run's eval.use_ema).")
_VERIFY = flags.DEFINE_bool("verify", True,
                            "Compare the exported model's logits with dlm's (torch, hf).")
_MDLM = flags.DEFINE_string("mdlm_weights", None,
                            "Instead of a workdir: a safetensors file of MDLM DIT weights, or a "
                            "Hugging Face folder of the public MDLM / BD3-LM checkpoints, to "
                            "import as a dlm export folder.")
_GPT2_DIR = flags.DEFINE_string("gpt2_dir", None,
                                "With --mdlm_weights: GPT-2's encoder.json and vocab.bpe, saved "
                                "as the import's tokenizer (the public checkpoints' vocabulary).")
_HEADS = flags.DEFINE_integer("heads", None, "Attention heads of --mdlm_weights (default: "
                              "read from its rotary_emb.inv_freq).")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_MDLM.value is None):
        raise app.UsageError("give exactly one of --workdir and --mdlm_weights")
    try:
        exporter.check_format(_FORMAT.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if _MDLM.value is not None:
        out = exporter.import_mdlm(_MDLM.value, _OUT.value, heads=_HEADS.value,
                                   gpt2_dir=_GPT2_DIR.value)
        summary = {"format": "safetensors", "out": str(out),
                   "imported": json.loads((out / "config.json").read_text())["process"]["name"]}
    else:
        summary = exporter.export_workdir(
            _WORKDIR.value, _OUT.value, _FORMAT.value, checkpoint_step=_STEP.value,
            use_ema=_USE_EMA.value, verify=_VERIFY.value)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main, "experiments.export")
