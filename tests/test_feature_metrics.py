"""Our metric set from features equals torch-fidelity's own `calculate_metrics` on the same images."""

from __future__ import annotations

import pytest
import torch
import torch_fidelity

from diffusion_unlearn.data import load_dataset
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.feature_metrics import SFID_ABSENT, metric_set
from diffusion_unlearn.eval.fid import CLASSIFIER_EXTRACTOR, UInt8Images
from diffusion_unlearn.grids import to_uint8


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits"
    return load_classifier(train_classifier(ClassifierConfig(out=str(out), epochs=2, seed=0, device="cpu")))


def _features(clf, uint8: torch.Tensor) -> dict[str, torch.Tensor]:
    images = uint8.float() / 255 * 2 - 1  # exactly what the registered extractor sees
    return {"pool": clf.features(images), "logits": clf.logits(images)}


def test_metric_set_equals_torch_fidelity(classifier, tmp_path):
    test = load_dataset("digits", split="test")
    generated = to_uint8(test.get_batch(torch.arange(0, 150))[0])  # (150, 1, 8, 8) uint8
    noise = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    generated = torch.cat([generated, noise])  # a set that differs from the reference
    reference = to_uint8(load_dataset("digits", split="train").get_batch(torch.arange(0, 300))[0])
    ours = metric_set(_features(classifier, generated), _features(classifier, reference), kid_subset_size=100)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(lambda i: generated[i], len(generated), False, lambda x: x),
        input2=UInt8Images(lambda i: reference[i], len(reference), False, lambda x: x),
        isc=True, fid=True, kid=True, prc=True, feature_extractor=CLASSIFIER_EXTRACTOR,
        feature_layer_isc="logits", feature_layer_fid="penultimate", feature_layer_kid="penultimate",
        feature_layer_prc="penultimate", feature_extractor_weights_path=str(classifier.path), kid_subset_size=100,
        cuda=False, batch_size=64, save_cpu_ram=True, cache=False, verbose=False)
    pairs = {"fid": "frechet_inception_distance", "kid_mean": "kernel_inception_distance_mean",
             "kid_std": "kernel_inception_distance_std", "is_mean": "inception_score_mean",
             "is_std": "inception_score_std", "precision": "precision", "recall": "recall", "f_score": "f_score"}
    for ours_key, their_key in pairs.items():
        assert ours[ours_key] == pytest.approx(theirs[their_key], rel=1e-5, abs=1e-7), ours_key
    assert ours["fid"] > 1.0 and 0 < ours["precision"] < 1  # the sets differ: the comparison is not vacuous
    assert ours["sfid"] is None and ours["sfid_absent"] == SFID_ABSENT


def test_fid_from_reference_statistics_equals_fid_from_features(classifier):
    from diffusion_unlearn.eval.feature_metrics import fid_statistics

    test = load_dataset("digits", split="test")
    a = _features(classifier, to_uint8(test.get_batch(torch.arange(0, 100))[0]))
    b = _features(classifier, to_uint8(test.get_batch(torch.arange(100, 250))[0]))
    from_features = metric_set(a, b)["fid"]
    from_stats = metric_set(a, reference_statistics=fid_statistics(b["pool"]))
    assert from_stats["fid"] == from_features and "kid_mean" not in from_stats
