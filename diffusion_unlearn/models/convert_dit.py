"""DiT checkpoints in, and out: original facebookresearch DiT, the reference unlearning code, stock diffusers.

Formats (reference §4.1, §4.4, §5.2):

* original: `DiT-XL-2-256x256.pt`, a plain state dict, or a training checkpoint `{"model", "ema", ...}` from
  which the original's `find_model` takes `"ema"`;
* reference unlearning (`DiT/forget.py`): `{"model": DataParallel state dict ("module.*"), "args": Namespace}`,
  loaded `weights_only` with `argparse.Namespace` allowed; `args.model` names the size;
* diffusers: `DiTTransformer2DModel` keys (`transformer_blocks.{i}.norm1.emb.*`, split q/k/v, ...), with the
  shared timestep and label embedders copied into every block. Loading re-ties the copies (they must be
  identical); export writes the copies.

Our model keeps the original keys, so original ↔ ours is `load_state_dict`/`state_dict` plus a configuration.
The weights give every size but the head count: a size name (`DiT-XL/2`) or `num_heads` supplies it.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from safetensors.torch import load_file

from diffusion_unlearn.fileio import UserError, load_pickled_checkpoint, strip_prefix, torch_save_atomic
from diffusion_unlearn.models.dit_transformer import DIT_SIZES, ClassConditionalDiT

# ----------------------------------------------------------------------------- original format


def read_dit_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict, Any]:
    """(state dict without `module.`, args or None) from an original or reference-unlearned DiT `.pt`.

    Takes `"ema"` when present (as the original's `find_model`), else `"model"`, else the whole object."""
    obj = load_pickled_checkpoint(path, trust_pickle=trust_pickle)
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and _is_state_dict(obj.get("ema")):
        state = obj["ema"]
    elif isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        state = obj["model"]
    elif _is_state_dict(obj):
        state = obj
    else:
        raise UserError(f"{path}: not a DiT checkpoint (expected a state dict, {{'ema': ...}} or {{'model', 'args'}})")
    return strip_prefix(state, "module."), args


def dit_config_from_state(state: dict, size: str | None = None, num_heads: int | None = None,
                          class_dropout_prob: float = 0.1) -> dict:
    """`ClassConditionalDiT` kwargs read from an original-layout state dict; the head count from `size` or
    `num_heads`. The label table is taken to hold the null row (`class_dropout_prob > 0`, as DiT trains)."""
    if size is not None and size not in DIT_SIZES:
        raise UserError(f"unknown DiT size {size!r}; choose one of {', '.join(DIT_SIZES)}")
    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight"):
        if key not in state:
            raise UserError(f"not an original-layout DiT state dict: {key} is missing")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    cfg = dict(sample_size=int(round(tokens ** 0.5)) * patch, patch_size=patch, in_channels=in_channels,
               hidden_size=hidden, depth=depth,
               mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if depth else 4.0,
               class_dropout_prob=class_dropout_prob,
               num_classes=state["y_embedder.embedding_table.weight"].shape[0] - int(class_dropout_prob > 0),
               learn_sigma=out_channels == 2 * in_channels)
    if size is not None:
        wanted = DIT_SIZES[size]
        found = {k: cfg[k] for k in ("depth", "hidden_size", "patch_size")}
        if any(found[k] != wanted[k] for k in found):
            raise UserError(f"the weights are not a {size} (they have {found}); pass the size they were trained as")
        num_heads = num_heads or wanted["num_heads"]
    if num_heads is None:
        raise UserError("the head count is not in the weights: pass the model size (--model DiT-XL/2, DiT-S/2, ...) "
                        "or --num-heads")
    return {**cfg, "num_heads": int(num_heads)}


def dit_from_original(state: dict, size: str | None = None, num_heads: int | None = None) -> ClassConditionalDiT:
    """Our model from an original-layout state dict (`module.` prefixes allowed), loaded strictly."""
    state = strip_prefix(state, "module.")
    model = ClassConditionalDiT(**dit_config_from_state(state, size, num_heads))
    _load_strict(model, state)
    return model


def load_original_dit(path: str | os.PathLike, size: str | None = None, num_heads: int | None = None,
                      trust_pickle: bool = False) -> ClassConditionalDiT:
    """An original or reference-unlearned DiT `.pt` as our model; the size defaults to the file's `args.model`."""
    state, args = read_dit_checkpoint(path, trust_pickle=trust_pickle)
    if size is None and num_heads is None and getattr(args, "model", None) in DIT_SIZES:
        size = args.model
    return dit_from_original(state, size, num_heads)


def dit_to_original(model: ClassConditionalDiT) -> dict[str, torch.Tensor]:
    """The original's state dict (same keys, `pos_embed` included), on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_original_dit(model: ClassConditionalDiT, path: str | os.PathLike) -> None:
    """A plain state dict that the original's `find_model` and `sample.py` load as they are."""
    torch_save_atomic(dit_to_original(model), path)


# ----------------------------------------------------------------------------- diffusers format

_BLOCK_MAP = {  # ours (original) -> diffusers, inside block i
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_EMBEDDER_MAP = {  # ours -> diffusers, copied into every block's norm1.emb
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}
_TOP_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


def diffusers_config(model: ClassConditionalDiT) -> dict:
    """A stock `DiTTransformer2DModel` configuration for our model (LayerNorm eps 1e-6 as the original)."""
    cfg = model.config
    if cfg.class_dropout_prob <= 0:
        raise UserError("stock diffusers' DiT always has a null label row; this model has none")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=model.out_channels, num_layers=cfg.depth,
                sample_size=cfg.sample_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
                activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False,
                norm_eps=1e-6, attention_bias=True)


def dit_to_diffusers_state(model: ClassConditionalDiT) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' keys: q/k/v split, the embedders copied into each of the blocks."""
    src = dit_to_original(model)
    out = {}
    for ours, theirs in _TOP_MAP.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = src[f"{ours}.{p}"]
    for i in range(model.config.depth):
        pre = f"transformer_blocks.{i}"
        for ours, theirs in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                out[f"{pre}.{theirs}.{p}"] = src[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(("to_q", "to_k", "to_v"), src[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{pre}.attn1.{name}.{p}"] = part.clone()
        for ours, theirs in _EMBEDDER_MAP.items():
            for p in ("weight", "bias"):
                if f"{ours}.{p}" in src:
                    out[f"{pre}.norm1.emb.{theirs}.{p}"] = src[f"{ours}.{p}"].clone()
    return out


def dit_to_diffusers(model: ClassConditionalDiT) -> DiTTransformer2DModel:
    """A stock diffusers `DiTTransformer2DModel` with our weights (its timestep frequencies differ: see
    docs/dit.md for the measured output difference)."""
    stock = DiTTransformer2DModel(**diffusers_config(model))
    stock.load_state_dict(dit_to_diffusers_state(model), strict=True)
    return stock.eval()


def dit_from_diffusers_state(state: dict, config: dict) -> ClassConditionalDiT:
    """Our model from diffusers' `DiTTransformer2DModel` weights and `config.json`: the per-block embedder
    copies are re-tied into one (they must be identical, as in every checkpoint converted from the original)."""
    depth, heads = int(config["num_layers"]), int(config["num_attention_heads"])
    hidden = heads * int(config["attention_head_dim"])
    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or in_channels)
    dst: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_MAP.items():
        for p in ("weight", "bias"):
            dst[f"{ours}.{p}"] = state[f"{theirs}.{p}"]
    for i in range(depth):
        pre = f"transformer_blocks.{i}"
        for ours, theirs in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                dst[f"blocks.{i}.{ours}.{p}"] = state[f"{pre}.{theirs}.{p}"]
        for p in ("weight", "bias"):
            qkv = [state[f"{pre}.attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")]
            dst[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(qkv)
    for ours, theirs in _EMBEDDER_MAP.items():
        for p in ("weight", "bias"):
            keys = [f"transformer_blocks.{i}.norm1.emb.{theirs}.{p}" for i in range(depth)]
            copies = [state[k] for k in keys if k in state]
            if not copies:
                continue
            diff = max(float((c - copies[0]).abs().max()) for c in copies)
            if diff > 0:
                raise UserError(f"the per-block copies of {theirs}.{p} differ (max {diff:.3g}): these weights were "
                                "fine-tuned in diffusers and cannot be tied back into the original DiT")
            dst[f"{ours}.{p}"] = copies[0]
    model = ClassConditionalDiT(sample_size=int(config["sample_size"]), patch_size=int(config["patch_size"]),
                                in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
                                num_classes=int(config["num_embeds_ada_norm"]), class_dropout_prob=0.1,
                                learn_sigma=out_channels == 2 * in_channels)
    dst["pos_embed"] = model.pos_embed.clone()  # diffusers does not store it; both compute the same table
    _load_strict(model, dst)
    return model


def load_diffusers_transformer(folder: str | os.PathLike) -> ClassConditionalDiT:
    """Our model from a diffusers `transformer/` folder (`config.json` + weights), without building the
    stock model (for XL/2 it would hold 75 M duplicate parameters)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a diffusers transformer folder: config.json is missing")
    config = json.loads((folder / "config.json").read_text())
    names = [f"diffusion_pytorch_model{v}.{e}" for v in ("", ".fp16") for e in ("safetensors", "bin")]
    found = [folder / n for n in names if (folder / n).is_file()]
    if not found:
        raise UserError(f"{folder} holds none of {', '.join(names)} (sharded weights are not supported)")
    state = load_file(found[0]) if found[0].suffix == ".safetensors" else load_pickled_checkpoint(found[0])
    return dit_from_diffusers_state({k: v.float() for k, v in state.items()}, config)


def load_diffusers_dit_folder(folder: str | os.PathLike) -> tuple[ClassConditionalDiT, AutoencoderKL, dict]:
    """A `facebook/DiT-XL-2-256`-layout folder: (our model, the VAE, the scheduler config)."""
    folder = Path(folder)
    for sub in ("transformer", "vae", "scheduler"):
        if not (folder / sub).is_dir():
            raise UserError(f"{folder} is not a diffusers DiT folder: {sub}/ is missing")
    model = load_diffusers_transformer(folder / "transformer")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return model, vae, scheduler_config


def export_diffusers_pipeline(model: ClassConditionalDiT, vae: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """A stock `DiTPipeline` folder for users of plain diffusers (its sampler is not the paper's, and its
    null label is hard-coded to 1000: only 1000-class models guide correctly there)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False)
    DiTPipeline(transformer=dit_to_diffusers(model), vae=vae, scheduler=scheduler).save_pretrained(folder)
    return Path(folder)


# ----------------------------------------------------------------------------- helpers


def _load_strict(model: ClassConditionalDiT, state: dict) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{what} {len(keys)}: {', '.join(keys[:6])}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong)) if keys]
        raise UserError(f"the weights do not fit a DiT of config {dict(model.config)}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
