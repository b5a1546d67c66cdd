"""The `pretrained_memory` suite of experiments.benchmark: host memory of loading a pretrained
folder.

A random Llama-layout folder of about 1 GB of float32 weights (`--pretrained_hidden`,
`--pretrained_layers`; a sharded safetensors index) is written, then loaded by
`dlm.runs.load_run` in a fresh process, which reports its resident memory (VmRSS) before
and its peak resident memory (ru_maxrss) after. On a CPU backend the loaded arrays live in
host memory too, so the target is peak - before ~= the arrays + one tensor (the largest),
not two copies of the model.
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


def random_hf_config(family: str, hidden: int, layers: int, vocab: int) -> dict:
    """A config.json of `family` ('llama' or 'llada') at the given sizes (heads of 64)."""
    heads, inter = max(hidden // 64, 1), int(2.75 * hidden)
    if family == "llada":
        return {"architectures": ["LLaDAModelLM"], "d_model": hidden, "n_layers": layers,
                "n_heads": heads, "n_kv_heads": heads, "mlp_hidden_size": inter,
                "vocab_size": vocab, "embedding_size": vocab, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "max_sequence_length": 4096,
                "mask_token_id": vocab - 1, "bos_token_id": 1, "eos_token_id": 2,
                "weight_tying": False}
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": inter, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


# A chat template in the shape of LLaDA's (its special tokens are words of the random vocab).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}w3 {{ m['role'] }} w4 {{ m['content'] }}"
                 " w5 {% endfor %}{% if add_generation_prompt %}w3 assistant w4 {% endif %}")


def write_word_tokenizer(folder: pathlib.Path, vocab: int,
                         chat_template: str = CHAT_TEMPLATE) -> None:
    """A word-level tokenizer.json over `vocab` ids ("w0".."wN", with <s> = 1 and </s> = 2)
    and a tokenizer_config.json naming them and holding `chat_template`, as transformers
    saves them."""
    import tokenizers

    from dlm.runs import pretrained

    vocab_map = {f"w{i}": i for i in range(vocab)}
    vocab_map.update({"<s>": 1, "</s>": 2})
    del vocab_map["w1"], vocab_map["w2"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab_map, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / pretrained.TOKENIZER_FILE))
    (folder / pretrained.TOKENIZER_CONFIG_FILE).write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}))


def write_random_folder(folder: pathlib.Path, family: str, hidden: int, layers: int, *,
                        vocab: int = _VOCAB, shards: int = _SHARDS, seed: int = 0) -> dict:
    """A random pretrained folder of `family` (float32, `shards` safetensors files and an
    index; names and shapes from `dlm.runs.pretrained`'s own tables) with
    `write_word_tokenizer`'s tokenizer; returns {tensors, bytes, largest}."""
    import numpy as np
    from safetensors.numpy import save_file

    from dlm.runs import pretrained

    folder.mkdir(parents=True, exist_ok=True)
    hf = random_hf_config(family, hidden, layers, vocab)
    (folder / "config.json").write_text(json.dumps(hf))
    fam = pretrained.FAMILIES[family]
    model = fam.model(hf, str(folder))
    layout = pretrained.Folder(folder, fam, hf, model, hf.get("mask_token_id"), {})
    shapes = {name: layout.expected_shape(path) for name, (path, _) in layout.names().items()}
    rng = np.random.default_rng(seed)
    names = list(shapes)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: (rng.standard_normal(shapes[n], np.float32) * 0.02 if len(shapes[n]) > 1
                       else np.ones(shapes[n], np.float32)) for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / pretrained.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    write_word_tokenizer(folder, vocab)
    sizes = [int(np.prod(shape)) * 4 for shape in shapes.values()]
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
        written = write_random_folder(folder, "llama", _HIDDEN.value, _LAYERS.value)
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
        "process; resident memory (VmRSS) before, peak resident memory (ru_maxrss) after. "
        "On CPU the loaded arrays are host memory, so the target is growth = arrays + about "
        "one tensor.",
        "",
        "| arrays GiB | largest tensor GiB | RSS before GiB | peak RSS after GiB | growth GiB | "
        "growth - arrays GiB | load s |",
        "|---|---|---|---|---|---|---|",
        f"| {got['arrays'] / gib:.3f} | {written['largest'] / gib:.3f} | "
        f"{got['before'] / gib:.3f} | {got['peak'] / gib:.3f} | {growth / gib:.3f} | "
        f"{extra / gib:.3f} | {got['seconds']:.1f} |",
    ])
