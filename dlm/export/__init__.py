"""Checkpoint export: safetensors, PyTorch reference modules, Hugging Face conversion.

    layout.py          the export folder: config.json, model.safetensors, tokenizer/ (numpy)
    torch_reference.py standalone PyTorch DiT and causal transformer (torch only)
    hf.py              the causal transformer as transformers' Starcoder2ForCausalLM
    mdlm.py            weights in the public MDLM DIT layout -> dlm names (numpy)
    convert.py         Flax parameters <-> tensors; an export folder back into dlm (JAX)
    exporter.py        export_workdir (experiments.export), import_mdlm (JAX)

Importing this package does not import JAX, torch or transformers; `torch_reference` needs
only torch and safetensors. The JAX-side entry points are loaded on first use.
"""

_LAZY = {
    "export_workdir": "dlm.export.exporter",
    "import_mdlm": "dlm.export.exporter",
    "FORMATS": "dlm.export.exporter",
    "load_export": "dlm.export.convert",
    "Exported": "dlm.export.convert",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dlm.export' has no attribute {name!r}")
