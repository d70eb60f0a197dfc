"""The original DiT (Peebles & Xie, facebookresearch/DiT `models.py`) as a diffusers model.

A faithful re-implementation (reference §4.1): submodule names reproduce the original
state-dict keys exactly (`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `pos_embed`,
`blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}`, `final_layer.*`), so an original
checkpoint loads with `load_state_dict(strict=True)`; see `convert_dit.py`.

Where diffusers' `DiTTransformer2DModel` differs from the original and we do not:

* one shared timestep and label embedder (diffusers copies both into every block: +75 M parameters for XL/2);
* the original frequencies `exp(−log(10⁴)·i/half)` (diffusers divides by half − 1: `downscale_freq_shift=1`);
* LayerNorm eps 1e-6 before the MLP too (diffusers' `norm3` takes the config's `norm_eps`, 1e-5 by default);
* **no label dropout inside the model**: label `num_classes` is the null class, and CFG label dropout is done
  once by the backbone adapter (`LatentDiTBackbone`), not independently per block in train mode.
  `class_dropout_prob` only decides, as in the original, whether the table has the null row.

`pos_embed` is the fixed 2-D sin-cos table, a persistent buffer (not a parameter: masks, optimizers and EMA
never see it), kept in the state dict under its original key.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# ----------------------------------------------------------------------------- model sizes (paper Table 1)

DIT_SIZES: dict[str, dict] = {
    f"DiT-{name}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for name, depth, hidden, heads in (("XL", 28, 1152, 16), ("L", 24, 1024, 16), ("B", 12, 768, 12),
                                       ("S", 12, 384, 6))
    for patch in (2, 4, 8)
}


def dit_num_params(depth: int, hidden_size: int, patch_size: int, in_channels: int = 4, num_classes: int = 1000,
                   learn_sigma: bool = True, class_dropout_prob: float = 0.1, mlp_ratio: float = 4.0,
                   frequency_embedding_size: int = 256, **_) -> int:
    """Trainable parameters of a DiT from its sizes alone (pos_embed excluded): DiT-XL/2 has 674,834,720."""
    d, p = hidden_size, patch_size
    out = in_channels * (2 if learn_sigma else 1)
    mlp = int(d * mlp_ratio)
    x_embedder = in_channels * p * p * d + d
    t_embedder = frequency_embedding_size * d + d + d * d + d
    y_embedder = (num_classes + (class_dropout_prob > 0)) * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + (d * 6 * d + 6 * d)
    final = (d * p * p * out + p * p * out) + (d * 2 * d + 2 * d)
    return x_embedder + t_embedder + y_embedder + depth * block + final


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """The original sinusoidal embedding: freqs exp(−log(max_period)·i/half), i < half; [cos, sin] order."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (N, dim)
    return emb


def sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table (MAE's, as DiT uses it), float64: (grid_size², embed_dim)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)  # w goes first
    emb_h = _sincos_1d(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = _sincos_1d(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed as DiT uses it: a stride-p convolution, flattened to tokens."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """The label table; row `num_classes` (present when the model was trained with label dropout) is null."""

    def __init__(self, num_classes: int, hidden_size: int, with_null: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (N, D)


# ----------------------------------------------------------------------------- transformer blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """timm's Attention (fused qkv, no dropout, no q/k norm) with `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, h, d/h)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, N, h, T, d/h)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, h, T, d/h)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """timm's Mlp with GELU(tanh), no dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


# ----------------------------------------------------------------------------- the model


@dataclass
class ClassConditionalDiTOutput(BaseOutput):
    """`sample`: the model output, (N, C_out, H, W): ε, then the variance values when `learn_sigma`."""

    sample: torch.Tensor


class ClassConditionalDiT(ModelMixin, ConfigMixin):
    """The original DiT. `forward(sample, timestep, class_labels)`: raw step indices 0..999, label
    `num_classes` = null. `sample_size` is the original's `input_size` (the latent side)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, with_null=class_dropout_prob > 0)
        grid = sample_size // patch_size
        pos = torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float().unsqueeze(0)  # (1, T, D)
        self.register_buffer("pos_embed", pos, persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def out_channels(self) -> int:
        return self.config.in_channels * (2 if self.config.learn_sigma else 1)

    @classmethod
    def from_size(cls, name: str, **overrides) -> "ClassConditionalDiT":
        """A freshly initialised model of a named size in `DIT_SIZES` (`DiT-XL/2`, `DiT-S/2`, ...)."""
        if name not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {name!r}; choose one of {', '.join(DIT_SIZES)}")
        return cls(**{**DIT_SIZES[name], **overrides})

    def initialize_weights(self) -> None:
        """The original initialisation: Xavier linears, N(0, 0.02) embedders, zeroed adaLN and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor,
                return_dict: bool = False) -> torch.Tensor | ClassConditionalDiTOutput:
        """Output (N, C_out, H, W) for latents `sample` (N, C, H, W) at raw steps `timestep` (scalar or (N,))."""
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)  # (N,) or (1,)
        t = t.expand(n) if t.numel() == 1 else t  # (N,)
        y = torch.as_tensor(class_labels, dtype=torch.long, device=sample.device).reshape(-1)  # (N,)
        x = self.x_embedder(sample) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, c)  # (N, T, D)
            else:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        x = self.unpatchify(x)  # (N, C_out, H, W)
        return ClassConditionalDiTOutput(sample=x) if return_dict else x
