"""PyTorch reference modules for dlm's exported networks (needs torch and safetensors only).

This file stands alone: `--format=torch` copies it into the export folder as
``dlm_torch.py``, so a PyTorch user needs neither dlm nor JAX::

    from dlm_torch import load
    model = load("export_dir")            # DiT or CausalTransformer, float32, eval mode
    logits_BLV = model(tokens_BL, t_B)    # t_B only for a time-conditioned DiT

The maths follows dlm/models: weight-only LayerNorm in float32 (eps 1e-5), rotary position
embedding in the rotate-half convention (base 10000), bias-free q/k/v/out and MLP projections,
tanh-approximated GELU, scaled dot-product attention under a mask (full, causal,
block_causal:b or bd3lm:b), and for the DiT adaLN-zero modulation from
c = silu(MLP(sinusoidal(t))) with t = 0 when the model is not time-conditioned.
Parameter names are the export's (``blocks.0.attn.q.weight``), so ``load_state_dict``
reads model.safetensors directly.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight


def rotary(x_BTHD: torch.Tensor, positions_BT: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE: the first and second halves of each head form the rotated pairs."""
    half = x_BTHD.shape[-1] // 2
    inv_freq_F = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles_BT1F = (positions_BT.float()[..., None] * inv_freq_F)[:, :, None, :]
    cos, sin = angles_BT1F.cos(), angles_BT1F.sin()
    x1, x2 = x_BTHD[..., :half], x_BTHD[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_mask(mask: str, q_len: int, kv_len: int) -> torch.Tensor:
    """bool [q_len, kv_len], True where a query may see a key; `mask` is dlm's mask string."""
    kind, _, size = mask.partition(":")
    b = int(size) if size else 0
    q = torch.arange(q_len)[:, None]
    k = torch.arange(kv_len)[None, :]
    if kind == "full":
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    if kind == "causal":
        return k <= q
    if kind == "block_causal":
        return k // b <= q // b
    if kind == "bd3lm":  # x_t ⊕ x_0: noisy block-diagonal, noisy -> earlier clean, clean causal
        half = kv_len // 2
        q_clean, k_clean = q >= half, k >= half
        q_block, k_block = (q % half) // b, (k % half) // b
        return ((~q_clean & ~k_clean & (q_block == k_block))
                | (~q_clean & k_clean & (q_block > k_block))
                | (q_clean & k_clean & (q_block >= k_block)))
    raise ValueError(f"unknown attention mask {mask!r}")


class Attention(nn.Module):
    """Bias-free q/k/v projections, RoPE on q and k, grouped-query attention, output."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, rope_base: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.rope_base = rope_base
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x_BTD, positions_BT, allowed_TS):
        B, T, _ = x_BTD.shape
        q = rotary(self.q(x_BTD).view(B, T, self.heads, self.head_dim), positions_BT,
                   self.rope_base)
        k = rotary(self.k(x_BTD).view(B, T, self.kv_heads, self.head_dim), positions_BT,
                   self.rope_base)
        v = self.v(x_BTD).view(B, T, self.kv_heads, self.head_dim)
        groups = self.heads // self.kv_heads  # query head h reads key/value head h // groups
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
        scores_BHTS = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_dim)
        scores_BHTS = scores_BHTS.masked_fill(~allowed_TS, torch.finfo(torch.float32).min)
        # A query that may see no key outputs zeros (as dlm's attention), not NaN.
        probs_BHTS = scores_BHTS.softmax(dim=-1) * allowed_TS
        out_BTHD = torch.einsum("bhts,bshd->bthd", probs_BHTS, v)
        return self.out(out_BTHD.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, mlp_ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_ratio * hidden, bias=False)
        self.fc2 = nn.Linear(mlp_ratio * hidden, hidden, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm attention and MLP residual block; adaLN-modulated when `cond_dim` is set."""

    def __init__(self, cfg: dict, cond_dim: int | None):
        super().__init__()
        D = cfg["hidden"]
        self.norm1 = LayerNorm(D, cfg["norm_eps"])
        self.attn = Attention(D, cfg["heads"], cfg["kv_heads"], cfg["rope_base"])
        self.norm2 = LayerNorm(D, cfg["norm_eps"])
        self.mlp = MLP(D, cfg["mlp_ratio"])
        self.adaln = None if cond_dim is None else nn.Linear(cond_dim, 6 * D)

    def forward(self, x_BTD, c_BC, positions_BT, allowed_TS):
        if self.adaln is None:
            x_BTD = x_BTD + self.attn(self.norm1(x_BTD), positions_BT, allowed_TS)
            return x_BTD + self.mlp(self.norm2(x_BTD))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(c_BC)[:, None].chunk(
            6, dim=-1)
        h = self.norm1(x_BTD) * (1 + scale_a) + shift_a
        x_BTD = x_BTD + gate_a * self.attn(h, positions_BT, allowed_TS)
        h = self.norm2(x_BTD) * (1 + scale_m) + shift_m
        return x_BTD + gate_m * self.mlp(h)


class TimestepEmbedding(nn.Module):
    """MLP of the sinusoidal features [cos | sin] of a scalar time."""

    def __init__(self, cond_dim: int, frequency_dim: int, max_period: float):
        super().__init__()
        self.frequency_dim, self.max_period = frequency_dim, max_period
        self.fc1 = nn.Linear(frequency_dim, cond_dim)
        self.fc2 = nn.Linear(cond_dim, cond_dim)

    def forward(self, t_B):
        half = self.frequency_dim // 2
        freqs_F = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32)
                            / half)
        args_BF = t_B.float()[:, None] * freqs_F[None]
        h = torch.cat([args_BF.cos(), args_BF.sin()], dim=-1)
        return self.fc2(F.silu(self.fc1(h)))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, vocab_size: int, cond_dim: int, eps: float):
        super().__init__()
        self.adaln = nn.Linear(cond_dim, 2 * hidden)
        self.norm = LayerNorm(hidden, eps)
        self.out = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, x_BTD, c_BC):
        shift, scale = self.adaln(c_BC)[:, None].chunk(2, dim=-1)
        return self.out(self.norm(x_BTD) * (1 + scale) + shift)


class _Stack(nn.Module):
    conditioned = False

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        cond_dim = cfg["cond_dim"] if self.conditioned else None
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["hidden"])
        self.blocks = nn.ModuleList(Block(cfg, cond_dim) for _ in range(cfg["layers"]))

    def _blocks(self, tokens_BL, c_BC, positions_BL, mask):
        B, L = tokens_BL.shape
        positions_BL = (torch.arange(L)[None].expand(B, L) if positions_BL is None
                        else positions_BL.expand(B, L))
        allowed_TS = attention_mask(mask or self.cfg["mask"], L, L)
        x_BTD = self.embed(tokens_BL).float()
        for block in self.blocks:
            x_BTD = block(x_BTD, c_BC, positions_BL, allowed_TS)
        return x_BTD


class DiT(_Stack):
    """dlm's masked-diffusion denoiser. `forward(tokens_BL, t_B=None, positions_BL=None,
    mask=None)` returns float32 logits [B, L, vocab] (raw: SUBS is the process's job)."""

    conditioned = True

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.time_embed = TimestepEmbedding(cfg["cond_dim"], cfg["time_frequency_dim"],
                                            cfg["time_max_period"])
        self.final = FinalLayer(cfg["hidden"], cfg["vocab_size"], cfg["cond_dim"],
                                cfg["norm_eps"])

    def forward(self, tokens_BL, t_B=None, positions_BL=None, mask=None):
        B = tokens_BL.shape[0]
        if not self.cfg["time_conditioning"]:
            t_B = torch.zeros(B)
        elif t_B is None:
            raise ValueError("this DiT is time-conditioned: pass t_B")
        c_BC = F.silu(self.time_embed(torch.as_tensor(t_B, dtype=torch.float32).expand(B)))
        return self.final(self._blocks(tokens_BL, c_BC, positions_BL, mask), c_BC)


class CausalTransformer(_Stack):
    """dlm's autoregressive transformer: logits [B, L, vocab] at i predict token i + 1.
    `t_B` is accepted and ignored, as in dlm."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.norm = LayerNorm(cfg["hidden"], cfg["norm_eps"])
        self.head = nn.Linear(cfg["hidden"], cfg["vocab_size"], bias=False)

    def forward(self, tokens_BL, t_B=None, positions_BL=None, mask=None):
        del t_B
        return self.head(self.norm(self._blocks(tokens_BL, None, positions_BL, mask)))


def build(model_config: dict) -> nn.Module:
    """An (uninitialised) DiT or CausalTransformer for config.json's "model" section."""
    cfg = {"norm_eps": 1e-5, "rope_base": 10000.0, "time_frequency_dim": 256,
           "time_max_period": 10000.0, "time_conditioning": False, **model_config}
    cls = {"dit": DiT, "transformer": CausalTransformer}.get(cfg.get("architecture"))
    if cls is None:
        raise ValueError(f"unknown architecture {cfg.get('architecture')!r}; expected 'dit' "
                         "or 'transformer'")
    return cls(cfg)


def load(directory) -> nn.Module:
    """The exported network in `directory` (config.json + model.safetensors), float32, in
    eval mode. Raises FileNotFoundError / ValueError naming the file and the tensors that
    disagree with the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = pathlib.Path(directory).expanduser()
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"not a dlm export: {path} does not exist")
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))["model"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a dlm export config (truncated?): "
                         f"{e!r}") from None
    model = build(model_config)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file (truncated or "
                         f"corrupt?): {e}") from None
    expected = model.state_dict()
    problems = [f"missing {n}" for n in expected if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [f"{n}: {tuple(tensors[n].shape)} in the file, {tuple(v.shape)} expected"
                 for n, v in expected.items() if n in tensors and tensors[n].shape != v.shape]
    if problems:
        raise ValueError(f"{weights_path} does not match {config_path}: "
                         + "; ".join(problems[:8]))
    model.load_state_dict({n: t.float() for n, t in tensors.items()})
    return model.eval()
