"""Build a fresh class-conditional denoiser from a named size preset: either DDPM U-Net class, or a latent DiT."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.models.dit_transformer import DIT_SIZES, ClassConditionalDiT
from diffusion_unlearn.models.unet_lineage import UNET_PRESETS, ClassConditionalUNet

# diffusers UNet2DModel sizes comparable to the lineage presets; index K of the class table is the null class.
DIFFUSERS_UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "digits": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "cifar10": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1),
}
BACKBONES = ("lineage-unet", "diffusers-unet")

# Small DiTs for small latents (patch 1: every latent pixel a token), beside the paper's sizes (DIT_SIZES).
# `digits`: 0.72 M parameters on the 4×4×4 latents of the digits VAE.
DIT_PRESETS: dict[str, dict] = {
    "digits": dict(hidden_size=96, depth=4, num_heads=4, patch_size=1),
    "tiny": dict(hidden_size=16, depth=1, num_heads=2, patch_size=1),
}


def check_unet_preset(backbone: str, preset: str) -> None:
    """A one-line error when `backbone` is no U-Net class or `preset` names none of its sizes."""
    presets = {"lineage-unet": UNET_PRESETS, "diffusers-unet": DIFFUSERS_UNET_PRESETS}
    if backbone not in presets:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if preset not in presets[backbone]:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(presets[backbone])}")


def build_unet(backbone: str, preset: str, *, channels: int, image_size: int, num_classes: int) -> torch.nn.Module:
    """A randomly initialised U-Net of `backbone` ∈ {lineage-unet, diffusers-unet} and size `preset`."""
    check_unet_preset(backbone, preset)
    if backbone == "lineage-unet":
        return ClassConditionalUNet.from_preset(preset, in_channels=channels, out_ch=channels,
                                                image_size=image_size, num_classes=num_classes)
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       num_class_embeds=num_classes + 1, norm_num_groups=32, **DIFFUSERS_UNET_PRESETS[preset])


def dit_spec(preset: str) -> dict:
    """The sizes of DiT preset `preset` (DIT_PRESETS, or a paper size such as `DiT-S/2`)."""
    spec = DIT_PRESETS.get(preset) or DIT_SIZES.get(preset)
    if spec is None:
        raise UserError(f"unknown DiT preset {preset!r}; choose one of {', '.join([*DIT_PRESETS, *DIT_SIZES])}")
    return spec


def build_dit(preset: str, *, latent_channels: int, latent_size: int, num_classes: int) -> ClassConditionalDiT:
    """A randomly initialised (adaLN-Zero) DiT of size `preset` on `latent_channels`×`latent_size`² latents,
    predicting its variance, with the null label row."""
    spec = dit_spec(preset)
    if latent_size % spec["patch_size"]:
        raise UserError(f"DiT preset {preset!r} has patch size {spec['patch_size']}, which does not divide the "
                        f"{latent_size}×{latent_size} latents; choose a smaller patch")
    return ClassConditionalDiT(sample_size=latent_size, in_channels=latent_channels, num_classes=num_classes,
                               learn_sigma=True, class_dropout_prob=0.1, **spec)
