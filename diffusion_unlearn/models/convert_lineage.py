"""The lineage's checkpoints (SA / SalUn / SFRon / DualOptim DDPM `ckpt.pth`) -> `ClassConditionalUNet`.

The published `ckpt.pth` is `torch.save` of a Python list (reference §1.4):
`[model_state (keys "module.*"), optimizer_state, step: int, ema_shadow (unprefixed)]`, the EMA element present
only when the run used EMA. There is no config inside (it lives in `logs/config.yaml`); every published
CIFAR-10 run uses the same configuration, our `cifar10` preset.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from diffusion_unlearn.fileio import UserError, load_pickled_checkpoint, strip_prefix
from diffusion_unlearn.models.unet_lineage import UNET_PRESETS, ClassConditionalUNet

# reference / golden config key -> our constructor kwarg
_CONFIG_KEYS = {
    "ch": "ch",
    "out_ch": "out_ch",
    "ch_mult": "ch_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "in_channels": "in_channels",
    "resamp_with_conv": "resamp_with_conv",
    "image_size": "image_size",
    "n_classes": "num_classes",
    "cond_drop_prob": "cond_drop_prob",
}
_TUPLE_KEYS = {"ch_mult", "attn_resolutions"}


def lineage_config_to_unet_kwargs(cfg: dict) -> dict:
    """Map a reference `config.model` dict (or a golden JSON `config`) to `ClassConditionalUNet` kwargs.

    Keys missing from `cfg` keep the CIFAR-10 preset's value; keys we do not use (`var_type`, `ema`, ...) are
    ignored. Our own kwarg names (`num_classes`) are accepted too.
    """
    if not isinstance(cfg, dict):
        cfg = vars(cfg)  # an argparse.Namespace (the reference's `config.model`)
    kwargs: dict[str, Any] = {}
    for key, value in cfg.items():
        name = _CONFIG_KEYS.get(key, key if key in UNET_PRESETS["cifar10"] else None)
        if name is None:
            continue
        kwargs[name] = tuple(int(v) for v in value) if name in _TUPLE_KEYS else value
    return {**UNET_PRESETS["cifar10"], **kwargs}


def unet_from_lineage_state_dict(state: dict, config: dict | None = None) -> ClassConditionalUNet:
    """Build a `ClassConditionalUNet` from a lineage state dict (`module.` prefixes allowed), strictly.

    `config` is a reference config dict (see `lineage_config_to_unet_kwargs`); default: the CIFAR-10 preset.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("expected a state dict (a dict of tensors) from a lineage checkpoint")
    state = strip_prefix(state, "module.")
    kwargs = lineage_config_to_unet_kwargs(config) if config is not None else dict(UNET_PRESETS["cifar10"])
    model = ClassConditionalUNet(**kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_short(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches: {_short(wrong_shape)}")
        raise UserError(
            "the checkpoint does not match the lineage conditional U-Net "
            f"(config {kwargs}): " + "; ".join(parts) + ". Check that the file is an SA/SalUn/SFRon/DualOptim "
            "DDPM checkpoint and that the model configuration (ch, ch_mult, num_res_blocks, attn_resolutions, "
            "image_size, n_classes) matches the run that wrote it."
        )
    model.load_state_dict(state, strict=True)
    return model


def read_lineage_checkpoint(
    path: str | os.PathLike, weights: str = "raw", trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a lineage `ckpt.pth` (or a plain state-dict file) into an unprefixed, complete state dict.

    `weights="raw"` takes the trained weights (`states[0]`), which is what the lineage itself forgets from and
    samples with. `weights="ema"` takes the EMA shadow (the last list element) laid over the raw weights, since
    the shadow only covers `requires_grad` parameters. Loading is `weights_only` unless `trust_pickle`.
    """
    if weights not in ("raw", "ema"):
        raise UserError(f"weights must be 'raw' or 'ema', not {weights!r}")
    obj = load_pickled_checkpoint(path, trust_pickle=trust_pickle)

    if isinstance(obj, (list, tuple)):
        if not obj or not _is_state_dict(obj[0]):
            raise UserError(
                f"{path}: a list checkpoint whose first element is not a state dict; expected the lineage format "
                "[model_state, optimizer_state, step, (ema_shadow)]"
            )
        raw = strip_prefix(obj[0], "module.")
        ema = obj[-1] if len(obj) >= 4 else None
    elif _is_state_dict(obj):
        raw, ema = strip_prefix(obj, "module."), None
    elif isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
        raw, ema = strip_prefix(obj["state_dict"], "module."), None
    else:
        raise UserError(
            f"{path}: not a lineage checkpoint (expected a list [model_state, optimizer_state, step, (ema)] "
            f"or a state dict), got {type(obj).__name__}"
        )

    if weights == "raw":
        return dict(raw)
    if not _is_state_dict(ema) or len(ema) == 0:
        raise UserError(
            f"{path}: this checkpoint holds no EMA weights (it was saved with `model.ema: false`, or it is a "
            "plain state dict); use weights='raw' (--weights raw)"
        )
    ema = strip_prefix(ema, "module.")
    unknown = [k for k in ema if k not in raw]
    if unknown:
        raise UserError(f"{path}: the EMA shadow has keys that the model state lacks: {_short(unknown)}")
    return {k: ema.get(k, v) for k, v in raw.items()}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
