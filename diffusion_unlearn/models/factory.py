"""Build a fresh class-conditional U-Net for either DDPM model class from a named size preset."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffusion_unlearn.fileio import UserError
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


def build_unet(backbone: str, preset: str, *, channels: int, image_size: int, num_classes: int) -> torch.nn.Module:
    """A randomly initialised U-Net of `backbone` ∈ {lineage-unet, diffusers-unet} and size `preset`."""
    if backbone == "lineage-unet":
        if preset not in UNET_PRESETS:
            raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(UNET_PRESETS)}")
        return ClassConditionalUNet.from_preset(preset, in_channels=channels, out_ch=channels,
                                                image_size=image_size, num_classes=num_classes)
    if backbone == "diffusers-unet":
        if preset not in DIFFUSERS_UNET_PRESETS:
            raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(DIFFUSERS_UNET_PRESETS)}")
        return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                           num_class_embeds=num_classes + 1, norm_num_groups=32, **DIFFUSERS_UNET_PRESETS[preset])
    raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
