"""`import-classifier`: a local ImageNet classifier weights file → an FA classifier folder (reference §5.1).

The reference's DiT FA classifier is torchvision's ImageNet ResNet-34 as it is (`resnet34(pretrained=True)`, the
file `resnet34-b627a593.pth`), reading the 256 px samples resized to 224×224 (bilinear, PIL) and normalised with
the ImageNet mean and std. torchvision's and timm's ResNets share one state-dict layout, so either file loads
exactly into timm's network of the same name; nothing is downloaded.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from diffusion_unlearn.config import ImportClassifierConfig
from diffusion_unlearn.convert import indexed_class_names
from diffusion_unlearn.eval.classifier import DIGITS_ARCH, META_FILE, WEIGHTS_FILE, build_network, read_state_dict
from diffusion_unlearn.fileio import UserError, atomic_dir, file_hash, save_safetensors_atomic, write_json

IMAGENET_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # torchvision's, on [0, 1] images


def import_classifier(cfg: ImportClassifierConfig) -> dict:
    """Check the file against `cfg.arch` (every key, every shape) and write the classifier folder to `cfg.out`."""
    if not cfg.path or not cfg.out:
        raise UserError("import-classifier needs a weights file and a destination: import-classifier FILE --out DIR")
    if cfg.arch == DIGITS_ARCH:
        raise UserError(f"import-classifier reads timm/torchvision ImageNet classifiers, not {DIGITS_ARCH}; "
                        "pass e.g. --arch resnet34")
    state = read_state_dict(cfg.path)
    net = build_network(cfg.arch, 1000, 3, cfg.image_size)
    head = net.pretrained_cfg["classifier"]
    if f"{head}.weight" not in state:
        raise UserError(f"{cfg.path} has no {head}.weight, so it is not a {cfg.arch} classifier (its keys start "
                        f"{', '.join(list(state)[:3])}); pass --arch with the file's architecture")
    num_classes = state[f"{head}.weight"].shape[0]
    names = indexed_class_names(cfg.class_names, num_classes, owner=f"{Path(cfg.path).name} ({head} layer)")
    net.reset_classifier(num_classes)
    try:  # not strict: torch fills BatchNorm's `num_batches_tracked`, absent from files saved before torch 0.4.1
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape differs
        raise UserError(f"{cfg.path} does not fit --arch {cfg.arch} ({str(e).splitlines()[1].strip()[:200]}); "
                        "pass the file's architecture") from e
    if missing or unexpected:
        raise UserError(f"{cfg.path} does not fit --arch {cfg.arch}: {len(missing)} missing keys, {len(unexpected)} "
                        f"unexpected, e.g. {sorted(missing + unexpected)[0]}; pass the file's architecture")
    meta = {
        "format": "diffusion-unlearn-classifier/1",
        "arch": cfg.arch,
        "num_classes": num_classes,
        "class_names": names,
        "channels": 3,
        "image_size": cfg.image_size,
        "input_range": "[-1,1]",
        "normalisation": IMAGENET_NORM,  # applied to images mapped to [0, 1]
        "resize": cfg.resize,
        "dataset": "imagenet",
        "source": str(Path(cfg.path).resolve()),
        "source_sha256": file_hash(cfg.path),
        "config": asdict(cfg),
    }
    with atomic_dir(Path(cfg.out)) as tmp:
        save_safetensors_atomic(net.state_dict(), tmp / WEIGHTS_FILE)
        write_json(tmp / META_FILE, meta)
    return {"out": cfg.out, "arch": cfg.arch, "num_classes": num_classes, "image_size": cfg.image_size,
            "resize": cfg.resize}
