"""The `eval` subcommand: sample the forgotten and retained classes, then FA, retained accuracy and FID."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffusion_unlearn.config import EvalConfig, protocol_deviations, resolve_device
from diffusion_unlearn.data import load_dataset
from diffusion_unlearn.eval.classifier import load_classifier
from diffusion_unlearn.eval.fid import compute_fid, find_inception_weights
from diffusion_unlearn.eval.metrics import classification_metrics
from diffusion_unlearn.fileio import UserError, write_json
from diffusion_unlearn.modelfolder import check_model_data, load_model_folder
from diffusion_unlearn.sample import generate


def fid_extractor_kind(cfg: EvalConfig, channels: int) -> str:
    """`auto`: the classifier's penultimate features for 1-channel data (digits), where Inception means
    nothing; torch-fidelity's Inception otherwise."""
    if cfg.fid_extractor != "auto":
        return cfg.fid_extractor
    return "classifier" if channels == 1 else "inception"


def evaluate(cfg: EvalConfig) -> dict:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    loaded = load_model_folder(cfg.model, device)
    dataset = load_dataset(cfg.dataset, cfg.data_root, "train")
    check_model_data(loaded, dataset, cfg.forget_class)
    clf = load_classifier(cfg.classifier, device)
    if clf.class_names != loaded.meta.class_names:
        raise UserError(f"classifier {cfg.classifier} knows classes {clf.class_names}, the model "
                        f"{loaded.meta.class_names}; train a classifier on the model's dataset")
    kind = fid_extractor_kind(cfg, dataset.channels)
    if kind == "inception":
        find_inception_weights(cfg.fid_weights)  # fail now, not after sampling
    k = loaded.meta.num_classes
    retained = [c for c in range(k) if c != cfg.forget_class]

    forget_images, forget_labels, _ = generate(loaded.pipeline, [cfg.forget_class], cfg.fa_samples, cfg.sampler)
    retain_images, retain_labels, _ = generate(loaded.pipeline, retained, cfg.retain_samples_per_class, cfg.sampler)
    images = torch.cat([forget_images, retain_images])  # (N, C, H, W)
    labels = torch.cat([forget_labels, retain_labels])  # (N,)
    metrics = classification_metrics(clf.logits(images), labels, cfg.forget_class)

    reference = dataset.with_classes(retained)
    fid = compute_fid(retain_images, reference, extractor=clf if kind == "classifier" else "inception",
                      excluded_class=cfg.forget_class, reference_count=cfg.fid_reference_count,
                      cache_dir=cfg.cache_dir, inception_weights=cfg.fid_weights, device=device,
                      protocol=cfg.fid_protocol)
    result = {
        "model": str(cfg.model), "dataset": cfg.dataset, "forget_class": cfg.forget_class,
        "forget_class_name": loaded.meta.class_names[cfg.forget_class],
        "fa": metrics["fa"], "retain_accuracy": metrics["retain_accuracy"], **fid,
        "forget_mean_prob": metrics["forget_mean_prob"], "forget_mean_entropy": metrics["forget_mean_entropy"],
        "per_class_accuracy": {loaded.meta.class_names[c]: a for c, a in metrics["per_class_accuracy"].items()},
        "fa_samples": metrics["n_forget"], "retain_samples": metrics["n_retain"],
        "retain_samples_per_class": cfg.retain_samples_per_class,
        "protocol": cfg.protocol, "protocol_deviations": protocol_deviations(cfg), **cfg.sampler.describe(),
        "classifier": str(cfg.classifier), "classifier_test_accuracy": clf.meta.get("test_accuracy"),
        "seconds": time.perf_counter() - started,
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out, result)
    return result
