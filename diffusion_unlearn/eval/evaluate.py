"""The `eval` subcommand: sample the forgotten and retained classes, then FA, retained accuracy and FID."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusion_unlearn.config import EvalConfig, SamplerConfig, protocol_deviations, resolve_device
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.eval.classifier import FAClassifier, check_classifier_classes, load_classifier
from diffusion_unlearn.eval.fid import compute_fid, find_inception_weights
from diffusion_unlearn.eval.metrics import classification_metrics
from diffusion_unlearn.eval.ood import OODCalibration, calibration_for, calibration_sets, forgetting_measures
from diffusion_unlearn.fileio import WriteError, write_json
from diffusion_unlearn.grids import to_uint8
from diffusion_unlearn.modelfolder import load_model_and_data
from diffusion_unlearn.pipelines.sampling import Pipeline, generate
from diffusion_unlearn.preflight import check_readable_file, check_writable_dir
from diffusion_unlearn.sampler_defaults import resolve_sampler

# Retained-class samples drawn at a time in `eval`: classified at once, then kept as uint8 for FID (ImageNet:
# 49,950 samples at 256 px are 9.8 GB as uint8, 39 GB as float32).
SAMPLES_PER_CHUNK = 2000


def fid_extractor_kind(cfg: EvalConfig, channels: int) -> str:
    """`auto`: the classifier's penultimate features for 1-channel data (digits), where Inception means
    nothing; torch-fidelity's Inception otherwise."""
    if cfg.fid_extractor != "auto":
        return cfg.fid_extractor
    return "classifier" if channels == 1 else "inception"


def sample_metrics(pipeline: Pipeline, dataset: ImageDataset, clf: FAClassifier, forget_class: int, fa_samples: int,
                   retain_per_class: int, sampler: SamplerConfig, *, fid_extractor: str, cache_dir: str,
                   reference_count: int | None = None, inception_weights: str | None = None, device: str = "cpu",
                   fid_protocol: str = "standard", ood: OODCalibration | None = None, progress: bool = True) -> dict:
    """Sample `fa_samples` images of the forgotten class and `retain_per_class` of each other class from the
    pipeline's current weights; FA, retained accuracy (classifier) and FID of the retained samples against
    `dataset`'s retained-class images; with an `ood` calibration also `fa_in_distribution` and `ood_rate`
    (eval/ood.py)."""
    retained = [c for c in range(dataset.num_classes) if c != forget_class]
    forget_images, forget_labels, _ = generate(pipeline, [forget_class], fa_samples, sampler, progress)
    logits, labels, kept = [clf.logits(forget_images)], [forget_labels], []
    trusted = {} if ood is None else forgetting_measures(clf, ood, forget_images, logits[0], forget_class)
    per_chunk = max(1, SAMPLES_PER_CHUNK // max(1, retain_per_class))  # classes sampled at a time
    for start in range(0, len(retained), per_chunk):  # per-index seeds: chunking changes no sample
        images, chunk_labels, _ = generate(pipeline, retained[start:start + per_chunk], retain_per_class, sampler,
                                           progress)  # (n, C, H, W) in [-1, 1], (n,)
        logits.append(clf.logits(images))
        labels.append(chunk_labels)
        kept.append(images if fid_protocol == "legacy" else to_uint8(images))  # 4× smaller than float32
    metrics = classification_metrics(torch.cat(logits), torch.cat(labels), forget_class)
    retain_images = torch.cat(kept)  # (N_retain, C, H, W)
    fid = compute_fid(retain_images, dataset.with_classes(retained),
                      extractor=clf if fid_extractor == "classifier" else "inception", excluded_class=forget_class,
                      reference_count=reference_count, cache_dir=cache_dir, inception_weights=inception_weights,
                      device=device, protocol=fid_protocol)
    return {"fa": metrics["fa"], **trusted, "retain_accuracy": metrics["retain_accuracy"], **fid,
            "forget_mean_prob": metrics["forget_mean_prob"], "forget_mean_entropy": metrics["forget_mean_entropy"],
            "per_class_accuracy": metrics["per_class_accuracy"], "fa_samples": metrics["n_forget"],
            "retain_samples": metrics["n_retain"]}


def evaluate(cfg: EvalConfig) -> dict:
    started = time.perf_counter()
    check_writable_dir(Path(cfg.out).parent, "--out")
    if cfg.fid_weights:
        check_readable_file(cfg.fid_weights, "Inception weights", "pass --fid-weights FILE")
    device = resolve_device(cfg.device)
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, cfg.forget_class, device)
    cfg = replace(cfg, sampler=resolve_sampler(cfg.sampler, loaded.meta.backbone, "eval", device))
    clf = load_classifier(cfg.classifier, device)
    check_classifier_classes(clf, loaded.meta.class_names)
    ood = calibration_for(clf, *calibration_sets(clf, dataset))
    kind = fid_extractor_kind(cfg, dataset.channels)
    if kind == "inception":
        find_inception_weights(cfg.fid_weights)  # fail now, not after sampling
    scores = sample_metrics(loaded.pipeline, dataset, clf, cfg.forget_class, cfg.fa_samples,
                            cfg.retain_samples_per_class, cfg.sampler, fid_extractor=kind,
                            reference_count=cfg.fid_reference_count, cache_dir=cfg.cache_dir,
                            inception_weights=cfg.fid_weights, device=device, fid_protocol=cfg.fid_protocol,
                            ood=ood)
    result = {
        "model": str(cfg.model), "dataset": cfg.dataset, "forget_class": cfg.forget_class,
        "forget_class_name": loaded.meta.class_names[cfg.forget_class],
        **scores,
        "per_class_accuracy": {loaded.meta.class_names[c]: a for c, a in scores["per_class_accuracy"].items()},
        "retain_samples_per_class": cfg.retain_samples_per_class,
        "protocol": cfg.protocol, "protocol_deviations": protocol_deviations(cfg), **cfg.sampler.describe(),
        "classifier": str(cfg.classifier), "classifier_test_accuracy": clf.meta.get("test_accuracy"),
        "seconds": time.perf_counter() - started,
    }
    try:
        write_json(cfg.out, result)
    except WriteError as e:  # keep the work: the metrics go to stdout
        print(json.dumps(result, indent=2, default=str))
        raise WriteError(f"{e} (the metrics were printed to stdout above)") from e
    return result
