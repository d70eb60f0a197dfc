"""The `convert` subcommand: import the DDPM lineage's files (reference §1.4, §2.1.1, §2.2).

- `--from lineage-ddpm ckpt.pth`: the published checkpoint (a list `[model_state ("module.*"), optimizer_state,
  step, ema_shadow]`) → a model folder of `ClassConditionalUNet`, raw weights (what the paper's runs forget from
  and sample with) or `--weights ema`.
- `--from lineage-mask FILE`: SFRon's bool `fisher_<γ>.pt` or SalUn's int64 `with_0.5.pt` → our mask file; a
  Fisher diagonal `forget_fisher.pt` with `--remain-fisher remain_fisher.pt` → the ratio mask at `--gamma`.
- `--from lineage-sa-fisher fisher_dict.pkl`: Selective Amnesia's Fisher diagonal (§2.3; a plain `pickle.dump` of
  CUDA tensors) → an SA Fisher `.safetensors` for `forget --method sa --sa-fisher FILE`, read by a restricted
  unpickler (`pickled_tensors`) on the CPU: no `--trust-pickle`, no GPU.

DiT (docs/dit.md): `--from dit-original CKPT --vae VAE --model DiT-XL/2` (original `.pt`, `{"ema"}`, or the
reference unlearning's `{"model", "args"}`, whose `args.model` gives the size) and `--from diffusers-dit FOLDER`
→ a DiT model folder; `--to dit-original` / `--to diffusers-dit` export one. Stock diffusers' DiT uses timestep
frequencies exp(−ln 10⁴·i/127) (the original: /128): exported to diffusers, outputs move by up to ~0.04.

Every `.pt` loads on the CPU with `weights_only=True`; `--trust-pickle` allows arbitrary unpickling, which only
files holding more than tensors and plain containers need (none of the files above do).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_unlearn.config import ConvertConfig
from diffusion_unlearn.fileio import UserError, strip_prefix
from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder
from diffusion_unlearn.models.convert_dit import (export_diffusers_pipeline, load_diffusers_dit_folder,
                                                  load_original_dit, save_original_dit)
from diffusion_unlearn.models.convert_lineage import read_lineage_checkpoint, unet_from_lineage_state_dict
from diffusion_unlearn.models.unet_lineage import UNET_PRESETS
from diffusion_unlearn.pickled_tensors import load_tensor_pickle
from diffusion_unlearn.methods.sa import save_fisher
from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone
from diffusion_unlearn.saliency import Mask, mask_density, ratio_mask, read_tensor_file, save_mask
from diffusion_unlearn.vae import load_vae

# torchvision/CIFAR-10 `batches.meta` order, the label order of every lineage CIFAR-10 run (§1.7).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def parse_class_names(spec: str) -> list[str]:
    """'cifar10' → the CIFAR-10 names; otherwise comma-separated names."""
    names = CIFAR10_CLASSES if spec == "cifar10" else [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--class-names {spec!r} must be 'cifar10' or at least 2 distinct comma-separated names")
    return names


def indexed_class_names(spec: str, num_classes: int, owner: str = "the DiT") -> list[str]:
    """'index' → '0'..'K−1' (our ImageNet folders); otherwise `parse_class_names`, which must give `owner`'s K."""
    names = [str(i) for i in range(num_classes)] if spec == "index" else parse_class_names(spec)
    if len(names) != num_classes:
        raise UserError(f"--class-names gives {len(names)} names but {owner} has {num_classes} classes; "
                        f"pass {num_classes} comma-separated names or --class-names index")
    return names


def convert_dit(cfg: ConvertConfig) -> dict:
    """An original/reference `.pt` (+ `--vae`) or a diffusers DiT folder → a DiT model folder at `cfg.out`."""
    if cfg.from_format == "dit-original":
        if not cfg.vae or not Path(cfg.vae).is_dir():
            raise UserError(f"--from dit-original needs --vae FOLDER, a diffusers AutoencoderKL folder (e.g. "
                            f"stabilityai/sd-vae-ft-ema); got {cfg.vae!r}")
        vae = load_vae(cfg.vae)
        model = load_original_dit(cfg.path, cfg.dit_size, cfg.num_heads, trust_pickle=cfg.trust_pickle)
    else:
        model, vae, _ = load_diffusers_dit_folder(cfg.path)
    names = indexed_class_names(cfg.class_names, int(model.config.num_classes))
    meta = ModelMeta(class_names=names, weights=cfg.weights, backbone=LatentDiTBackbone.name,
                     history=[{"op": "convert", "source": str(Path(cfg.path).resolve()), "format": cfg.from_format,
                               "weights": cfg.weights}])
    save_model_folder(cfg.out, model, meta, vae=vae)
    return {"out": cfg.out, "backbone": LatentDiTBackbone.name, "weights": cfg.weights,
            "parameters": sum(p.numel() for p in model.parameters())}


def export_dit(cfg: ConvertConfig) -> dict:
    """Our DiT model folder (PATH) → the original's plain `.pt` or a stock diffusers `DiTPipeline` folder."""
    loaded = load_model_folder(cfg.path)
    if not LatentDiTBackbone.owns(loaded.denoiser):
        raise UserError(f"--to {cfg.to_format} exports DiT model folders; {cfg.path} holds a "
                        f"{loaded.meta.backbone} model")
    if cfg.to_format == "dit-original":
        save_original_dit(loaded.denoiser, cfg.out)
        return {"out": cfg.out, "format": "dit-original"}
    export_diffusers_pipeline(loaded.denoiser, loaded.vae, cfg.out)
    return {"out": cfg.out, "format": "diffusers-dit",
            "note": "stock diffusers' timestep frequencies (/127) move outputs by up to ~0.04 (docs/dit.md); "
                    "its DiTPipeline guides with null label 1000, so only 1000-class models guide correctly"}


def convert_checkpoint(cfg: ConvertConfig) -> dict:
    """A lineage `ckpt.pth` → a model folder at `cfg.out` (meta `weights` raw/ema, history `convert`)."""
    if cfg.model_preset not in UNET_PRESETS:
        raise UserError(f"unknown --model-preset {cfg.model_preset!r}; choose one of {', '.join(UNET_PRESETS)}")
    names = parse_class_names(cfg.class_names)
    state = read_lineage_checkpoint(cfg.path, weights=cfg.weights, trust_pickle=cfg.trust_pickle)
    unet = unet_from_lineage_state_dict(state, {**UNET_PRESETS[cfg.model_preset], "num_classes": len(names)})
    meta = ModelMeta(class_names=names, weights=cfg.weights,
                     dataset="cifar10" if cfg.class_names == "cifar10" else None,
                     history=[{"op": "convert", "source": str(Path(cfg.path).resolve()), "format": "lineage-ddpm",
                               "weights": cfg.weights}])
    save_model_folder(cfg.out, unet, meta)
    return {"out": cfg.out, "weights": cfg.weights, "parameters": sum(p.numel() for p in unet.parameters())}


def lineage_mask(cfg: ConvertConfig) -> Mask:
    """A bool or 0/1 integer mask file as it is; a Fisher diagonal (floating) with its remain pair → the ratio
    mask `(F_f + 1e-15)/(F_r + 1e-15) ≥ γ`, as `generate_fisher_mask.py` makes it (§2.1.1)."""
    tensors = read_tensor_file(cfg.path, trust_pickle=cfg.trust_pickle)
    if not tensors:
        raise UserError(f"{cfg.path} holds no tensors; pass a lineage mask or Fisher .pt file")
    floating = {k for k, v in tensors.items() if v.is_floating_point()}
    if not floating:
        if cfg.remain_fisher is not None:
            raise UserError(f"{cfg.path} is already a mask (bool/integer tensors); drop --remain-fisher")
        return {k: v != 0 for k, v in tensors.items()}
    if len(floating) != len(tensors) or cfg.remain_fisher is None:
        raise UserError(f"{cfg.path} holds Fisher diagonals (floating tensors); pass its pair with "
                        "--remain-fisher remain_fisher.pt (and --gamma, paper 3)")
    remain = read_tensor_file(cfg.remain_fisher, trust_pickle=cfg.trust_pickle)
    if set(remain) != set(tensors) or any(remain[k].shape != v.shape for k, v in tensors.items()):
        raise UserError(f"{cfg.remain_fisher} does not pair with {cfg.path} (different parameter names or shapes); "
                        "pass the remain_fisher.pt written beside the forget_fisher.pt")
    return ratio_mask(tensors, remain, cfg.gamma)


def convert_sa_fisher(cfg: ConvertConfig) -> dict:
    """SA's `fisher_dict.pkl` → an SA Fisher file at `cfg.out`: `module.` stripped (the lineage U-Net's names are
    ours), every entry a non-negative floating tensor on the CPU."""
    if not cfg.out.endswith(".safetensors"):
        raise UserError(f"--out {cfg.out!r}: an SA Fisher is written as .safetensors; e.g. --out sa_fisher.safetensors")
    fisher = strip_prefix(load_tensor_pickle(cfg.path))
    bad = [k for k, v in fisher.items() if not v.is_floating_point() or bool((v < 0).any())]
    if bad:
        raise UserError(f"{cfg.path} is not a Fisher diagonal: {bad[0]} is not a non-negative floating tensor")
    save_fisher(fisher, cfg.out, source=str(Path(cfg.path).resolve()))
    return {"out": cfg.out, "tensors": len(fisher), "parameters": sum(v.numel() for v in fisher.values())}


def convert(cfg: ConvertConfig) -> dict:
    """The `convert` subcommand."""
    if not cfg.path or not cfg.out:
        raise UserError("convert needs a file and a destination: convert --from FORMAT FILE --out DEST")
    if cfg.to_format != "model-folder":
        return export_dit(cfg)
    if cfg.from_format in ("dit-original", "diffusers-dit"):
        return convert_dit(cfg)
    if cfg.from_format == "lineage-ddpm":
        return convert_checkpoint(cfg)
    if cfg.from_format == "lineage-sa-fisher":
        return convert_sa_fisher(cfg)
    mask = lineage_mask(cfg)
    metadata = {"kind": "lineage-import", "source": str(Path(cfg.path).resolve()),
                **({"remain_fisher": str(Path(cfg.remain_fisher).resolve()), "gamma": cfg.gamma}
                   if cfg.remain_fisher else {})}
    save_mask(cfg.out, mask, metadata)
    return {"out": cfg.out, "density": mask_density(mask), "tensors": len(mask)}
