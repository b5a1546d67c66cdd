"""The `pretrained_memory` suite of experiments.benchmark: host memory of loading a pretrained
folder.

A random Llama-layout folder of about 1 GB of float32 weights (`--pretrained_hidden`,
`--pretrained_layers`; a sharded safetensors index) is written, then loaded by
`dlm.runs.load_run` in a fresh process, which reports its resident memory (VmRSS) before
and its peak resident memory (ru_maxrss) after. On a CPU backend the loaded arrays live in host memory too, so the target
is peak - before ~= the arrays + one tensor (the largest), not two copies of the model.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import flags

_HIDDEN = flags.DEFINE_integer("pretrained_hidden", 1024, "Hidden width of the random model.")
_LAYERS = flags.DEFINE_integer("pretrained_layers", 16, "Layers of the random model.")
_VOCAB = 32000
_SHARDS = 4


def write_random_llama(folder: pathlib.Path, hidden: int, layers: int) -> dict:
    """A random LlamaForCausalLM folder (float32, `_SHARDS` safetensors files and an index)
    and a WordLevel tokenizer; returns {tensors, bytes, largest}."""
    import numpy as np
    import tokenizers
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    heads, inter = hidden // 64, int(2.75 * hidden)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "intermediate_size": inter, "vocab_size": _VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}))
    shapes = {"model.embed_tokens.weight": (_VOCAB, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (_VOCAB, hidden)}
    for i in range(layers):
        t = f"model.layers.{i}."
        shapes.update({t + "input_layernorm.weight": (hidden,),
                       t + "post_attention_layernorm.weight": (hidden,),
                       t + "mlp.gate_proj.weight": (inter, hidden),
                       t + "mlp.up_proj.weight": (inter, hidden),
                       t + "mlp.down_proj.weight": (hidden, inter)})
        shapes.update({t + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"})
    rng = np.random.default_rng(0)
    names = list(shapes)
    weight_map = {}
    for s in range(_SHARDS):
        file = f"model-{s + 1:05d}-of-{_SHARDS:05d}.safetensors"
        part = names[s::_SHARDS]
        save_file({n: rng.standard_normal(shapes[n], np.float32) * 0.02 for n in part},
                  str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    vocab = {f"w{i}": i for i in range(_VOCAB)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.save(str(folder / "tokenizer.json"))
    sizes = [int(np.prod(s)) * 4 for s in shapes.values()]
    return {"tensors": len(shapes), "bytes": sum(sizes), "largest": max(sizes)}


_MEASURE = """
import json, resource, sys, time
import jax
from dlm import runs
jax.numpy.zeros(1).block_until_ready()
status = open("/proc/self/status").read().split("VmRSS:")[1].split()
before = int(status[0]) * 1024  # resident now (kB), not the import's peak
start = time.perf_counter()
run = runs.load_run(sys.argv[1])
jax.block_until_ready(run.params)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size = sum(x.nbytes for x in jax.tree.leaves(run.params))
print(json.dumps({"before": before, "peak": peak, "arrays": size, "seconds": seconds}))
"""


def measure(folder: pathlib.Path) -> dict:
    """Peak RSS of `load_run(folder)` in a fresh single-device CPU process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(folder)], capture_output=True,
                            text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(f"loading {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_section(command: str) -> str:
    import datetime
    import platform

    gib = 2**30
    with tempfile.TemporaryDirectory(prefix="dlm_pretrained_") as tmp:
        folder = pathlib.Path(tmp) / "llama"
        written = write_random_llama(folder, _HIDDEN.value, _LAYERS.value)
        got = measure(folder)
    growth = got["peak"] - got["before"]
    extra = growth - got["arrays"]
    return "\n".join([
        "## Loading a pretrained folder: host memory",
        "",
        f"`{command}` on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"{datetime.date.today()}, CPU backend, one device. A random Llama-layout folder "
        f"(hidden {_HIDDEN.value}, {_LAYERS.value} layers, vocabulary {_VOCAB}: "
        f"{written['tensors']} float32 tensors in {_SHARDS} safetensors shards, "
        f"{written['bytes'] / gib:.2f} GiB) loaded by `dlm.runs.load_run` in a fresh "
        "process; resident memory (VmRSS) before, peak resident memory (ru_maxrss) after. On CPU the loaded "
        "arrays are host memory, so the target is growth = arrays + about one tensor.",
        "",
        "| arrays GiB | largest tensor GiB | RSS before GiB | peak RSS after GiB | growth GiB | "
        "growth - arrays GiB | load s |",
        "|---|---|---|---|---|---|---|",
        f"| {got['arrays'] / gib:.3f} | {written['largest'] / gib:.3f} | "
        f"{got['before'] / gib:.3f} | {got['peak'] / gib:.3f} | {growth / gib:.3f} | "
        f"{extra / gib:.3f} | {got['seconds']:.1f} |",
    ])
