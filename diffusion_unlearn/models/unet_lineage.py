"""The SA / SalUn / SFRon / DualOptim class-conditional U-Net, as a diffusers model.

A faithful re-implementation of the lineage's `Conditional_Model` (DualOptim `DDPM/models/diffusion.py`,
reference §1.1), itself the DDIM "ddpm_cifar10" U-Net with a class embedding added.
Submodule names reproduce the reference state-dict keys exactly, so a reference state dict (after stripping
the DataParallel `module.` prefix) loads with `load_state_dict(strict=True)`; see `convert_lineage.py`.

Differences from the reference, all deliberate:

* The null class is **label index `num_classes`** (the package-wide convention): `forward` maps that label to
  the learned `null_classes_emb` vector. The reference instead selects the null vector by a random mask inside
  the model (classifier-free-guidance label dropout). Here the model is deterministic: **CFG label dropout
  is done by the training code**, which replaces dropped labels by `num_classes`. `cond_drop_prob` stays in
  the config for the record only; the model never reads it.
* `forward` returns the ε prediction for the given labels; the guided combination
  `(1+w)·ε_c − w·ε_∅` (reference `mode="test"`) is done by the pipeline.
* The class-embedding width fed to `temb_cemb_proj` is `4*ch` here; the reference hard-codes 512, which is the
  same number for the published `ch=128` and would be a shape mismatch for any other `ch`.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# ----------------------------------------------------------------------------- presets

UNET_PRESETS: dict[str, dict] = {
    # The published CIFAR-10 configuration of the lineage (38,632,323 parameters in 334 tensors).
    "cifar10": dict(
        ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
        in_channels=3, resamp_with_conv=True, image_size=32, num_classes=10, cond_drop_prob=0.1,
    ),
    # 8x8 grey digits (resolutions 8, 4, 2 px; 1,211,713 parameters). Measured: ~0.13 s per Adam step at batch
    # 128 on 2 idle CPU cores; 1200 steps (lr 1e-3, CFG dropout 0.1) give digits that a logistic regression
    # fitted on the real digits labels 99/100 correctly (DDIM 100 steps, s=3).
    "digits": dict(
        ch=32, out_ch=1, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
        in_channels=1, resamp_with_conv=True, image_size=8, num_classes=10, cond_drop_prob=0.1,
    ),
    # Unit tests only: forward + backward on a batch of 8 in a few tens of milliseconds.
    "tiny": dict(
        ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
        in_channels=1, resamp_with_conv=True, image_size=8, num_classes=10, cond_drop_prob=0.1,
    ),
}


# ----------------------------------------------------------------------------- building blocks


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of raw (unscaled) step indices, half sines then half cosines (reference L17-35)."""
    assert timesteps.dim() == 1
    half_dim = embedding_dim // 2
    scale = math.log(10000) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) * -scale)  # (half,)
    emb = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)  # (B, 2*half)
    if embedding_dim % 2 == 1:  # zero pad
        emb = F.pad(emb, (0, 1, 0, 0))  # (B, embedding_dim)
    return emb


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, x * sigmoid(x) as in the reference, as torch's fused kernel (one pass, no temporary; equal to the
    reference's two-op form within float rounding)."""
    return F.silu(x)


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 - reference name
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        if self.with_conv:
            x = self.conv(x)  # (B, C, 2H, 2W)
        return x


class Downsample(nn.Module):
    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # no asymmetric padding in torch conv, so pad by hand in forward
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)  # (B, C, H+1, W+1)
            x = self.conv(x)  # (B, C, H/2, W/2)
        else:
            x = F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
        return x


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv, + per-channel bias from concat[temb, cemb], GroupNorm-swish-dropout-conv, skip."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float,
                 temb_channels: int, cemb_channels: int):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_cemb_proj = nn.Linear(temb_channels + cemb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            # the reference's 3x3 `conv_shortcut` option is never enabled; only the 1x1 path exists
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)  # (B, Cin, H, W)
        h = nonlinearity(h)
        h = self.conv1(h)  # (B, Cout, H, W)
        emb = nonlinearity(torch.cat((temb, cemb), dim=1))  # (B, temb_ch + cemb_ch)
        h = h + self.temb_cemb_proj(emb)[:, :, None, None]  # (B, Cout, H, W)
        h = self.norm2(h)
        h = nonlinearity(h)
        h = self.dropout(h)
        h = self.conv2(h)  # (B, Cout, H, W)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)  # (B, Cout, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv q/k/v/proj_out, residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)  # (B, C, H, W)
        b, c, h, w = h_.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, C)

        # softmax(q kᵀ / √C) v, the reference's two bmm, in torch's fused attention kernel (equal within float
        # rounding; where torch picks its flash kernel, no (HW × HW) weight matrix is materialised)
        h_ = F.scaled_dot_product_attention(tokens(self.q(h_)), tokens(self.k(h_)), tokens(self.v(h_)))  # (B,1,HW,C)
        h_ = h_[:, 0].transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        h_ = self.proj_out(h_)
        return x + h_


# ----------------------------------------------------------------------------- the model


@dataclass
class ClassConditionalUNetOutput(BaseOutput):
    """`sample`: the ε prediction, (B, out_ch, H, W)."""

    sample: torch.Tensor


class ClassConditionalUNet(ModelMixin, ConfigMixin):
    """The lineage's conditional U-Net (`Conditional_Model`). Label `num_classes` selects the learned null vector.

    `forward(sample, timestep, class_labels)` predicts ε. Timesteps are raw step indices 0..999 (not rescaled).
    CFG label dropout is not done here: the trainer passes label `num_classes` for dropped samples.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        in_channels: int = 3,
        resamp_with_conv: bool = True,
        image_size: int = 32,
        num_classes: int = 10,
        cond_drop_prob: float = 0.1,  # recorded only: label dropout happens in the training code
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)  # from_pretrained gives lists back
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.ch = ch
        self.temb_ch = ch * 4
        # The reference hard-codes the class-embedding width to 512 (ResnetBlock default argument), which equals
        # 4*ch only for the published ch=128; 4*ch is the width the class MLP actually produces.
        self.cemb_ch = ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.gradient_checkpointing = False
        for c in {ch * m for m in (1, *ch_mult)}:
            if c % 32:
                raise ValueError(f"every channel count must be divisible by 32 (GroupNorm(32)); got ch={ch}, ch_mult={ch_mult}")

        # class embedding (registered first in the reference: `null_classes_emb` heads its state dict)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))

        # timestep embedding
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])

        self.classes_emb = nn.Embedding(num_classes, ch)
        self.cemb = nn.Module()
        self.cemb.dense = nn.ModuleList([nn.Linear(ch, self.cemb_ch), nn.Linear(self.cemb_ch, self.cemb_ch)])

        def res_block(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(in_channels=cin, out_channels=cout, dropout=dropout,
                               temb_channels=self.temb_ch, cemb_channels=self.cemb_ch)

        # downsampling
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = image_size
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(res_block(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        # middle
        self.mid = nn.Module()
        self.mid.block_1 = res_block(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = res_block(block_in, block_in)

        # upsampling (built from the lowest resolution up, stored in resolution order like the reference)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            skip_in = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]
                block.append(res_block(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)

        # end
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    # ------------------------------------------------------------------------- construction helpers

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ClassConditionalUNet":
        """A freshly initialised model of a named configuration in `UNET_PRESETS`, with keyword overrides."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
        return cls(**{**UNET_PRESETS[name], **overrides})

    # ------------------------------------------------------------------------- forward

    def _block(self, block: ResnetBlock, h: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, temb, cemb)
        return block(h, temb, cemb)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        class_labels: torch.Tensor,
        return_dict: bool = False,
    ) -> torch.Tensor | ClassConditionalUNetOutput:
        """ε prediction for noisy images `sample` (B, C, H, W) at raw steps `timestep` (scalar or (B,)).

        `class_labels` is int64 (B,); the value `num_classes` selects the learned null embedding (unconditional).
        """
        x = sample
        bsz = x.shape[0]
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"expected {self.resolution}x{self.resolution} images, got {tuple(x.shape[2:])}")

        # timestep embedding
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=x.device)
        timestep = timestep.to(x.device).reshape(-1)  # (B,) or (1,)
        if timestep.numel() == 1:
            timestep = timestep.expand(bsz)  # (B,)
        elif timestep.numel() != bsz:
            raise ValueError(f"expected 1 or {bsz} timesteps, got {timestep.numel()}")
        dtype = self.temb.dense[0].weight.dtype
        temb = get_timestep_embedding(timestep, self.ch).to(dtype)  # (B, ch)
        temb = self.temb.dense[0](temb)  # (B, 4ch)
        temb = nonlinearity(temb)
        temb = self.temb.dense[1](temb)  # (B, 4ch)

        # class embedding: label K -> learned null vector, chosen per sample without a Python loop.
        class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=x.device).reshape(-1)  # (B,)
        if class_labels.numel() != bsz:
            raise ValueError(f"expected {bsz} class labels, got {class_labels.numel()}")
        is_null = class_labels == self.num_classes  # (B,)
        # labels outside 0..K still fail inside nn.Embedding (no host sync needed to check them here)
        safe_labels = torch.where(is_null, torch.zeros_like(class_labels), class_labels)  # (B,)
        cemb = self.classes_emb(safe_labels)  # (B, ch)
        null = self.null_classes_emb.to(cemb.dtype)[None, :].expand_as(cemb)  # (B, ch)
        cemb = torch.where(is_null[:, None], null, cemb)  # (B, ch)
        cemb = self.cemb.dense[0](cemb)  # (B, 4ch)
        cemb = nonlinearity(cemb)
        cemb = self.cemb.dense[1](cemb)  # (B, 4ch)

        # downsampling
        hs = [self.conv_in(x)]  # [(B, ch, H, W)]
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self._block(self.down[i_level].block[i_block], hs[-1], temb, cemb)  # (B, ch*mult, h, w)
                if len(self.down[i_level].attn) > 0:
                    h = self.down[i_level].attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(self.down[i_level].downsample(hs[-1]))  # (B, c, h/2, w/2)

        # middle
        h = hs[-1]  # (B, c_low, h_low, w_low)
        h = self._block(self.mid.block_1, h, temb, cemb)
        h = self.mid.attn_1(h)
        h = self._block(self.mid.block_2, h, temb, cemb)

        # upsampling
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = torch.cat([h, hs.pop()], dim=1)  # (B, c + c_skip, h, w)
                h = self._block(self.up[i_level].block[i_block], h, temb, cemb)  # (B, ch*mult, h, w)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)  # (B, c, 2h, 2w)

        # end
        h = self.norm_out(h)  # (B, ch, H, W)
        h = nonlinearity(h)
        h = self.conv_out(h)  # (B, out_ch, H, W)

        if return_dict:
            return ClassConditionalUNetOutput(sample=h)
        return h
