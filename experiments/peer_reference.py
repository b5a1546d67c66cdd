"""The PyTorch side of the `peer` suite: times kuleshov-group/bd3lms, unmodified, at the
shapes of `experiments.peer_benchmarks` and prints one JSON object of medians (ms).

Runs under a separate torch venv (it imports neither jax nor dlm):

  BD3LMS=<bd3lms checkout> PEER_TOK=<65-char tokenizer folder> \
      <torch venv>/bin/python experiments/peer_reference.py

The tokenizer folder is a transformers tokenizer of Tiny Shakespeare's 65 characters with
'\\n' as BOS (id 0), so the vocabulary is 65 + mask = 66 as on the dlm side;
`peer_reference.py --write_tokenizer CORPUS FOLDER` writes one. The reference's own
Hydra configs are loaded and only the sizes are overridden (hidden 256, 4 blocks, 4 heads,
cond 128, length 256, dropout 0, SDPA attention, fp32, no EMA), 2 torch threads.
"""

import json
import os
import statistics
import sys
import time

ROWS = ("mdlm_train_b16", "fwd_b1", "fwd_b16", "bd3lm_train_bs4", "bd3lm_train_bs16",
        "first_hitting", "ddpm_cache", "bd3lm_bs16_no_cache")


def _import_reference(root: str):
    import torch

    try:  # timm (imported by bd3lms' utils) imports torchvision, whose C ops need a
        import torchvision  # noqa: F401  matching torch; defining the two it registers
    except (RuntimeError, ImportError, OSError):  # at import is enough on CPU
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}",
                                 "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    sys.path.insert(0, root)
    import diffusion  # bd3lms

    return diffusion


def _config(root: str, tok_path: str, algo: str, block_size: int, first_hitting: bool = True):
    from omegaconf import OmegaConf

    configs = os.path.join(root, "configs")
    base = OmegaConf.load(os.path.join(configs, "config.yaml"))
    for key in ("defaults", "hydra", "wandb", "trainer", "checkpointing", "loader", "callbacks"):
        base.pop(key, None)
    c = OmegaConf.merge(base, {
        "model": OmegaConf.load(os.path.join(configs, "model", "small.yaml")),
        "algo": OmegaConf.load(os.path.join(configs, "algo", f"{algo}.yaml")),
        "noise": OmegaConf.load(os.path.join(configs, "noise", "loglinear.yaml"))})
    c.model.update(hidden_size=256, cond_dim=128, length=256, n_blocks=4, n_heads=4,
                   dropout=0.0, attn_backend="sdpa")
    c.block_size = block_size
    c.loader = {"batch_size": 16, "eval_batch_size": 1}
    c.training.ema = 0
    c.eval.gen_ppl_eval_model_name_or_path = tok_path
    c.sampling.first_hitting = first_hitting
    c.sampling.kv_cache = False
    return c


def _median_ms(fn, warmup: int, iters: int, *args) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def write_tokenizer(corpus: str, folder: str) -> None:
    """A WordLevel tokenizer of the corpus's characters (sorted, so '\\n' is id 0 = BOS)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    with open(corpus, encoding="utf-8") as f:
        chars = sorted(set(f.read()))
    if len(chars) != 65:
        raise ValueError(f"{corpus}: {len(chars)} distinct characters, expected 65")
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="\n"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                         bos_token="\n").save_pretrained(folder)


def main():
    if sys.argv[1:2] == ["--write_tokenizer"]:
        write_tokenizer(sys.argv[2], sys.argv[3])
        return
    import torch
    import transformers

    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "2")))
    root = os.environ["BD3LMS"]
    tok_path = os.environ["PEER_TOK"]
    iters = int(os.environ.get("PEER_ITERS", "10"))
    sampler_iters = int(os.environ.get("PEER_SAMPLER_ITERS", "3"))
    diffusion = _import_reference(root)
    tok = transformers.AutoTokenizer.from_pretrained(tok_path)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def model(algo, block_size, first_hitting=True):
        torch.manual_seed(0)
        return diffusion.Diffusion(_config(root, tok_path, algo, block_size, first_hitting),
                                   tokenizer=tok)

    def train_ms(m, batch=16):
        m.train()
        x0 = torch.randint(1, 65, (batch, 256))
        x0[:, 0] = tok.bos_token_id
        attention = torch.ones_like(x0)
        opt = torch.optim.AdamW(m._get_parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0)

        def step():
            opt.zero_grad(set_to_none=True)
            m._loss(x0, attention.clone()).loss.backward()  # their NELBO (2L input for bd3lm)
            opt.step()

        return _median_ms(step, 3, iters)

    m = model("mdlm", 256)
    out["params"] = sum(p.numel() for p in m.backbone.parameters())
    out["mdlm_train_b16"] = train_ms(m)
    m.eval()
    for batch in (1, 16):
        x = torch.full((batch, 256), m.mask_index)
        x[:, 0] = tok.bos_token_id
        with torch.no_grad():
            out[f"fwd_b{batch}"] = _median_ms(m.backbone, 3, iters, x, torch.zeros(batch))
    for block in (4, 16):
        out[f"bd3lm_train_bs{block}"] = train_ms(model("bd3lm", block))
    for row, algo, block, first_hitting in [("first_hitting", "mdlm", 256, True),
                                            ("ddpm_cache", "mdlm", 256, False),
                                            ("bd3lm_bs16_no_cache", "bd3lm", 16, True)]:
        sampler = model(algo, block, first_hitting).eval()
        out[row] = _median_ms(sampler._semi_ar_sampler, 1, sampler_iters, 1, 256, 256 // block,
                              256)
        _, out[f"{row}_nfe"] = sampler._semi_ar_sampler(1, 256, 256 // block, 256)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
