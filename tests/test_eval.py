"""Evaluation: FA metrics, the FA classifier (digits CNN and timm), FID through torch-fidelity."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from diffusion_unlearn.data import ImageDataset, load_dataset
from diffusion_unlearn.eval import classifier as classifier_mod
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.fid import (
    CLASSIFIER_EXTRACTOR,
    ClassifierFeatures,
    compute_fid,
    reference_cache_name,
    to_uint8,
)
from diffusion_unlearn.eval.metrics import classification_metrics
from diffusion_unlearn.fileio import UserError




# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    big = 20.0
    logits = torch.full((6, 3), -big)  # (N, K); each row's argmax is set below
    pred = torch.tensor([0, 1, 0, 1, 2, 0])
    logits[torch.arange(6), pred] = big
    logits[1] = torch.tensor([0.0, 0.0, 0.0])  # uniform: argmax 0 (first), p(0) = 1/3, entropy log 3
    requested = torch.tensor([0, 0, 0, 1, 2, 2])
    m = classification_metrics(logits, requested, forget_class=0)
    assert m["n_forget"] == 3 and m["n_retain"] == 3
    assert m["fa"] == pytest.approx(1.0)  # rows 0, 1 (uniform → argmax 0), 2
    assert m["retain_accuracy"] == pytest.approx(2 / 3)  # row 3 right, row 4 right, row 5 wrong
    assert m["forget_mean_prob"] == pytest.approx((1 + 1 / 3 + 1) / 3, abs=1e-6)
    assert m["forget_mean_entropy"] == pytest.approx(math.log(3) / 3, abs=1e-6)
    assert m["per_class_accuracy"] == pytest.approx({0: 1.0, 1: 1.0, 2: 0.5})


def test_fa_counts_only_the_forget_class():
    logits = torch.eye(4)[torch.tensor([3, 1, 2, 2])] * 10  # (4, 4) predictions 3, 1, 2, 2
    m = classification_metrics(logits, torch.tensor([2, 2, 2, 1]), forget_class=2)
    assert m["fa"] == pytest.approx(1 / 3)
    assert m["retain_accuracy"] == 0.0
    assert m["per_class_accuracy"] == pytest.approx({1: 0.0, 2: 1 / 3})


def test_entropy_of_one_hot_softmax_is_zero_not_nan():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])  # softmax underflows to exactly one-hot
    m = classification_metrics(logits, torch.tensor([0]), forget_class=0)
    assert m["forget_mean_entropy"] == 0.0
    assert m["forget_mean_prob"] == 1.0


def test_metrics_of_an_empty_group_are_none_and_bad_class_is_a_user_error():
    m = classification_metrics(torch.randn(4, 3), torch.tensor([1, 2, 1, 2]), forget_class=0)
    assert m["fa"] is None and m["forget_mean_entropy"] is None and m["n_forget"] == 0
    with pytest.raises(UserError, match="forget class"):
        classification_metrics(torch.randn(4, 3), torch.tensor([1, 2, 1, 2]), forget_class=3)


# ----------------------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def digits_clf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits"
    return train_classifier(ClassifierConfig(out=str(out), epochs=10, seed=0, device="cpu"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


def test_digits_classifier_accuracy_and_round_trip(digits_clf_dir, digits):
    meta = json.loads((digits_clf_dir / "classifier.json").read_text())
    assert meta["test_accuracy"] >= 0.98
    assert meta["class_names"] == [str(k) for k in range(10)]
    assert meta["arch"] == "digits-cnn" and meta["input_range"] == "[-1,1]"
    _, test = digits
    images, labels = test.get_batch(torch.arange(len(test)))
    a, b = load_classifier(digits_clf_dir), load_classifier(digits_clf_dir)
    logits = a.logits(images)  # (N, 10)
    assert torch.equal(logits, b.logits(images))
    assert (logits.argmax(1) == labels).double().mean().item() == pytest.approx(meta["test_accuracy"])
    assert a.features(images[:5]).shape == (5, 128)
    assert a.weights_sha256 == b.weights_sha256 and len(a.weights_sha256) == 64


def test_classifier_rejects_wrong_folder_and_wrong_images(digits_clf_dir, tmp_path):
    with pytest.raises(UserError, match="not a classifier folder"):
        load_classifier(tmp_path)
    damaged = tmp_path / "damaged"
    shutil.copytree(digits_clf_dir, damaged)
    meta = json.loads((damaged / "classifier.json").read_text())
    (damaged / "classifier.json").write_text(json.dumps({**meta, "num_classes": 7}))
    with pytest.raises(UserError, match="damaged classifier"):
        load_classifier(damaged)
    clf = load_classifier(digits_clf_dir)
    with pytest.raises(UserError, match="do not fit the classifier"):
        clf.logits(torch.zeros(2, 3, 32, 32))


# ----------------------------------------------------------------------------- timm classifier


def _fake_dataset(split: str, n: int = 24) -> ImageDataset:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return ImageDataset(
        name="fake", split=split, root=None, class_names=["a", "b"], channels=3, image_size=32,
        transform_id="fake-raw", targets=torch.arange(n) % 2,
        pixels=torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
    )


def test_timm_classifier_fine_tunes_from_an_init_checkpoint(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(classifier_mod, "load_dataset", lambda name, root=None, split="train": _fake_dataset(split))
    imagenet = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18-imagenet.pth")
    cfg = ClassifierConfig(
        dataset="fake", out=str(tmp_path / "clf"), arch="resnet18", epochs=1, batch_size=12, lr=0.0,
        init=str(tmp_path / "resnet18-imagenet.pth"), device="cpu",
    )
    clf = load_classifier(train_classifier(cfg))
    saved = load_file(tmp_path / "clf" / "classifier.safetensors")
    assert torch.equal(saved["conv1.weight"], imagenet.state_dict()["conv1.weight"])  # lr 0: the init, unchanged
    assert saved["fc.weight"].shape == (2, 512)
    assert clf.meta["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    images = _fake_dataset("test").get_batch(torch.arange(5))[0]
    assert clf.logits(images).shape == (5, 2) and clf.features(images).shape == (5, 512)


# ----------------------------------------------------------------------------- FID


def test_fid_with_classifier_features_separates_real_from_noise(digits_clf_dir, digits, tmp_path):
    train, test = digits
    clf = load_classifier(digits_clf_dir)
    real = test.get_batch((test.targets != 3).nonzero().squeeze(1))[0]  # (N, 1, 8, 8)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(extractor=clf, excluded_class=3, cache_dir=tmp_path)
    fid_real = compute_fid(real, train, **kw)
    fid_noise = compute_fid(noise, train, **kw)
    fid_forgotten = compute_fid(test.get_batch((test.targets == 3).nonzero().squeeze(1))[0], train, **kw)
    assert fid_real["fid"] < 0.05 * min(fid_noise["fid"], fid_forgotten["fid"])
    assert fid_real["fid_reference_count"] == int((train.targets != 3).sum())
    assert fid_real["fid_generated_count"] == len(real)
    assert "digits-cnn penultimate" in fid_real["fid_feature_extractor"]


def test_classifier_feature_extractor_reads_uint8_like_the_classifier(digits_clf_dir, digits):
    _, test = digits
    images = test.get_batch(torch.arange(64))[0]  # (64, 1, 8, 8) in [-1, 1]
    extractor = ClassifierFeatures(CLASSIFIER_EXTRACTOR, ["penultimate"], str(digits_clf_dir))
    (got,) = extractor(to_uint8(images))
    want = load_classifier(digits_clf_dir).features(images)  # (64, 128)
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # only 8-bit quantisation apart


def test_fid_reuses_cached_reference_statistics(digits_clf_dir, digits, tmp_path):
    train, test = digits
    clf = load_classifier(digits_clf_dir)
    generated = test.get_batch(torch.arange(200))[0]
    kw = dict(extractor=clf, excluded_class=0, reference_count=500, cache_dir=tmp_path)
    first = compute_fid(generated, train, **kw)
    assert any(p.name.startswith(first["fid_reference_cache"]) for p in tmp_path.iterdir())
    unreadable = copy.copy(train)
    unreadable.get_batch = lambda indices: pytest.fail("cached reference images were read again")
    assert compute_fid(generated, unreadable, **kw)["fid"] == first["fid"]


def test_reference_cache_name_tracks_everything_the_statistics_depend_on(digits):
    train, _ = digits
    base = reference_cache_name(train, 3, 1000, "digits-cnn-abc")
    other_transform = copy.copy(train)
    other_transform.transform_id = "digits 0..16/other"
    names = [
        reference_cache_name(train, 4, 1000, "digits-cnn-abc"),
        reference_cache_name(train, None, 1000, "digits-cnn-abc"),
        reference_cache_name(train, 3, 999, "digits-cnn-abc"),
        reference_cache_name(train, 3, 1000, "digits-cnn-abd"),
        reference_cache_name(other_transform, 3, 1000, "digits-cnn-abc"),
        reference_cache_name(train.subset(torch.arange(100, len(train))), 3, 1000, "digits-cnn-abc"),
    ]
    assert len({base, *names}) == len(names) + 1
    assert base == reference_cache_name(train, 3, 1000, "digits-cnn-abc")
    assert all(c.isalnum() or c in "_.-" for c in "".join(names))


def test_inception_without_weights_fails_fast(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub: no cached weights
    train, test = digits
    generated = test.get_batch(torch.arange(10))[0]
    start = time.monotonic()
    with pytest.raises(UserError, match="--fid-weights"):
        compute_fid(generated, train, extractor="inception", excluded_class=None, cache_dir=tmp_path)
    with pytest.raises(UserError, match="not found"):
        compute_fid(generated, train, extractor="inception", excluded_class=None, cache_dir=tmp_path,
                    inception_weights=str(tmp_path / "missing.pth"))
    assert time.monotonic() - start < 5


def test_fid_of_uint8_samples_equals_fid_of_their_float_originals(digits_clf_dir, digits, tmp_path):
    train, test = digits
    clf = load_classifier(digits_clf_dir)
    generated = test.get_batch(torch.arange(100))[0]  # (100, 1, 8, 8) in [-1, 1]
    kw = dict(extractor=clf, excluded_class=0, reference_count=300, cache_dir=tmp_path)
    assert compute_fid(to_uint8(generated), train, **kw)["fid"] == compute_fid(generated, train, **kw)["fid"]
    with pytest.raises(UserError, match="legacy"):
        compute_fid(to_uint8(generated), train, protocol="legacy", **kw)


def test_eval_sampling_in_chunks_changes_no_score(tiny_model, digits_clf_dir, digits, tmp_path, monkeypatch):
    """`eval` samples the retained classes a few at a time (uint8 in memory): per-index seeds make the scores
    those of one big batch."""
    from diffusion_unlearn.config import SamplerConfig
    from diffusion_unlearn.eval import evaluate as evaluate_module
    from diffusion_unlearn.modelfolder import load_model_folder

    pipeline, clf = load_model_folder(tiny_model).pipeline, load_classifier(digits_clf_dir)
    run = lambda: evaluate_module.sample_metrics(  # noqa: E731
        pipeline, digits[0], clf, 3, 4, 3, SamplerConfig(sampler="ddim", steps=2, guidance_scale=3.0),
        fid_extractor="classifier", cache_dir=str(tmp_path), progress=False)
    whole = run()
    monkeypatch.setattr(evaluate_module, "SAMPLES_PER_CHUNK", 6)  # two classes at a time
    chunked = run()
    assert chunked["retain_samples"] == whole["retain_samples"] == 27
    for key in ("fa", "retain_accuracy", "fid", "forget_mean_prob"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key
