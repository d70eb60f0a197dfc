"""The `fid-stats` subcommand: FID reference statistics of a dataset as a first-class file (as NVlabs/edm's
`fid.py ref` and ADM's reference batches do).

The reference images are chosen, converted and read exactly as `eval` reads its FID reference (eval/fid.py:
`reference_features`, whose feature cache `eval` shares), and mu/sigma are torch-fidelity's statistics of their features
(`feature_metrics.fid_statistics`), so FID against the file equals `eval`'s FID. The `.npz`
(`npz_files.write_reference_statistics`) holds `mu` (D,), `sigma` (D, D), `count` and a JSON `record`: the
extractor and its weights hash, dataset, split, selection and protocol.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_unlearn.config import FidStatsConfig, resolve_device
from diffusion_unlearn.data import ImageDataset, load_dataset
from diffusion_unlearn.eval.classifier import check_classifier_classes, load_classifier
from diffusion_unlearn.eval.feature_metrics import fid_statistics
from diffusion_unlearn.eval.fid import FID_PROTOCOLS, extractor_for, reference_features
from diffusion_unlearn.eval.npz_files import write_reference_statistics
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.preflight import check_writable_dir

FORMAT = "diffusion-unlearn-fid-stats/1"


def fid_stats(cfg: FidStatsConfig) -> dict:
    """Write `cfg.out`; returns its record (with `count` and `out`)."""
    check_writable_dir(Path(cfg.out).parent, "--out")
    device = resolve_device(cfg.device)
    dataset = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.image_size)
    if cfg.exclude_class is not None and not 0 <= cfg.exclude_class < dataset.num_classes:
        raise UserError(f"--exclude-class {cfg.exclude_class} is outside {dataset.name}'s classes "
                        f"0..{dataset.num_classes - 1}")
    extractor = extractor_for(_extractor(cfg, dataset, device), cfg.fid_weights, device)
    features, about = reference_features(dataset, extractor, excluded_class=cfg.exclude_class,
                                         reference_count=cfg.count, cache_dir=cfg.cache_dir,
                                         protocol=cfg.fid_protocol)
    stats = fid_statistics(features["pool"])  # pool: (N, D)
    count = about["count"]
    record = {
        "format": FORMAT,
        "feature_extractor": extractor.label, "feature_extractor_id": extractor.id,
        "feature_layer": extractor.layers[0], "weights_sha256": extractor.sha256,
        "dataset": dataset.name, "data_root": dataset.root, "split": dataset.split,
        "image_size": dataset.image_size, "transform": dataset.transform_id,
        "excluded_class": cfg.exclude_class, "selection": about["selection"],
        "fid_protocol": cfg.fid_protocol, "fid_protocol_description": FID_PROTOCOLS[cfg.fid_protocol],
        # the name `eval` caches the same reference under: it names the exact images (items hash)
        "reference_cache_name": about["cache_name"],
    }
    write_reference_statistics(cfg.out, stats["mu"], stats["sigma"], count, record)
    return {**record, "count": count, "out": str(cfg.out)}


def _extractor(cfg: FidStatsConfig, dataset: ImageDataset, device: str):
    """`auto`: the FA classifier's penultimate features for 1-channel data (digits), Inception otherwise (as
    `eval` chooses)."""
    kind = cfg.fid_extractor if cfg.fid_extractor != "auto" else ("classifier" if dataset.channels == 1
                                                                   else "inception")
    if kind == "inception":
        return "inception"
    if not cfg.classifier:
        raise UserError(f"the classifier feature extractor ({dataset.name}) needs --classifier FOLDER (an FA "
                        "classifier: `diffusion-unlearn train-classifier`); or pass --fid-extractor inception")
    clf = load_classifier(cfg.classifier, device)
    check_classifier_classes(clf, dataset.class_names)
    return clf
