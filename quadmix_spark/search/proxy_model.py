"""The proxy language model (spec §3.2, §6.2): RegMix's ``tinyllama_1M`` shape, LLaMA-style, in plain torch.

token embedding → n_layer × [RMSNorm → causal self-attention with rotary embeddings over the full head
dimension (``scaled_dot_product_attention(is_causal=True)``) → residual; RMSNorm → SwiGLU MLP → residual]
→ RMSNorm → untied output projection.  No biases anywhere.

Parameter count of the default shape (d = 256, ffn = 512, 2 layers, vocab 50,432), "non-embedding" meaning
everything except the token embedding and the output projection::

    per layer: qkv 3·d² + out d² + gate/up 2·d·ffn + down ffn·d + 2 norms 2·d = 655,872
    2 layers + final norm d                                                  = 1,312,000
    embedding + output projection 2·V·d = 25,821,184                  → total 27,133,184
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 50432
    n_layer: int = 2
    n_head: int = 8
    d_model: int = 256
    ffn: int = 512
    seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("the head dimension must be even (rotary embeddings)")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "ffn", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def non_embedding_params(self) -> int:
        """Closed form of :func:`count_params`' first value."""
        d, f = self.d_model, self.ffn
        return self.n_layer * (4 * d * d + 3 * d * f + 2 * d) + d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, head_dim] (float32), the "rotate half" layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, hd] float32; computed in float32, returned in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.n_head = shape.n_head
        self.head_dim = shape.head_dim
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.gate = nn.Linear(shape.d_model, shape.ffn, bias=False)
        self.up = nn.Linear(shape.d_model, shape.ffn, bias=False)
        self.down = nn.Linear(shape.ffn, shape.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.norm1 = RMSNorm(shape.d_model, shape.norm_eps)
        self.attn = Attention(shape)
        self.norm2 = RMSNorm(shape.d_model, shape.norm_eps)
        self.mlp = SwiGLU(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class ProxyLM(nn.Module):
    """LLaMA-style decoder of :class:`ModelShape`; ``forward(idx[B, T]) -> logits[B, T, V]``."""

    def __init__(self, shape: ModelShape = ModelShape()):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        cos, sin = rope_cache(shape.seq_len, shape.head_dim, shape.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; the residual output projections scaled by 1/sqrt(2·n_layer); norms 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.shape.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.rope_cos.shape[0]:
            return rope_cache(T, self.shape.head_dim, self.shape.rope_base, device=device)
        return self.rope_cos[:T], self.rope_sin[:T]

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, d]."""
        cos, sin = self._rope(idx.shape[1], idx.device)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(idx))

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, T] in float32."""
        logits = self(idx)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return ce.view(targets.shape)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token cross-entropy (over the tokens where ``mask`` is true, when given)."""
        if mask is None:
            logits = self(idx)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        ce = self.token_losses(idx, targets)
        m = mask.to(ce.dtype)
        return (ce * m).sum() / m.sum().clamp_min(1.0)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(non_embedding, total)`` parameters; non-embedding excludes the token embedding and the output
    projection (the convention behind RegMix's "1M" model)."""
    total = sum(p.numel() for p in model.parameters())
    emb = 0
    for m in model.modules():
        if isinstance(m, ProxyLM):
            emb += m.embed.weight.numel() + m.head.weight.numel()
    return total - emb, total
