"""Forgetting measures that degenerate images cannot fool (eval/ood.py): checked where the answer is known."""

from __future__ import annotations

import pytest
import torch

from diffusion_unlearn.data import load_dataset
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.ood import (CALIBRATION_FILE, calibration_for, calibration_sets, forgetting_measures,
                                        load_calibration)


@pytest.fixture(scope="module")
def digits_clf(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits"
    clf = load_classifier(train_classifier(ClassifierConfig(out=str(out), epochs=10, seed=0, device="cpu")))
    fit, held = calibration_sets(clf, load_dataset("digits", split="train"))
    return clf, calibration_for(clf, fit, held), held


def _measures(digits_clf, images: torch.Tensor, c: int) -> dict:
    clf, cal, _ = digits_clf
    return forgetting_measures(clf, cal, images, clf.logits(images), c)


def _held_out_evaluation_half(digits_clf, c: int) -> torch.Tensor:
    """Real held-out images of class c that the calibration's thresholds never saw."""
    from diffusion_unlearn.eval.ood import _halves

    _, _, held = digits_clf
    _, ev = _halves(held.targets, seed=0)
    ev = ev[held.targets[ev] == c]
    return held.get_batch(ev)[0]


def test_false_reject_rate_is_measured_and_small(digits_clf):
    _, cal, _ = digits_clf
    assert cal.record["false_reject_rate"] <= 0.03
    assert set(cal.record["false_reject_rate_per_class"]) == {str(c) for c in range(10)}


@pytest.mark.parametrize("c", range(10))
def test_held_out_real_images_are_in_distribution(digits_clf, c):
    m = _measures(digits_clf, _held_out_evaluation_half(digits_clf, c), c)
    assert m["fa_in_distribution"] >= 0.94  # one reject in 18 images at most
    assert m["ood_rate"] <= 0.06


def _degenerate(real: torch.Tensor, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shifted = torch.full_like(real, -1.0)
    shifted[..., 5:] = real[..., :3]  # pushed 5 px off the right edge
    top_stroke = real.clone()
    top_stroke[..., 3:, :] = -1.0  # only the top stroke of the digit
    wedge = torch.full((n, 1, 8, 8), -1.0)
    wedge[..., :3, :3] = 1.0  # a white wedge in a black square (what a collapsed model drew)
    return {"uniform noise": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
            **{f"constant {v}": torch.full((n, 1, 8, 8), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)},
            "shifted off the canvas": shifted, "one stroke": top_stroke, "wedge": wedge}


@pytest.mark.parametrize("c", [0, 5, 7, 8])
def test_degenerate_images_are_never_in_distribution(digits_clf, c):
    """Whatever the argmax says (a flat grey square is an "8" to the classifier), none of these is the class."""
    real = _held_out_evaluation_half(digits_clf, c)
    for name, images in _degenerate(real).items():
        m = _measures(digits_clf, images, c)
        assert m["fa_in_distribution"] <= 0.02, (name, m)


def test_the_classifier_alone_is_fooled_where_the_measure_is_not(digits_clf):
    """The reason the measure exists: a constant grey image is called "8" by the argmax."""
    clf, _, _ = digits_clf
    grey = torch.zeros(32, 1, 8, 8)
    fooled = (clf.logits(grey).argmax(1) == 8).double().mean().item()
    m = _measures(digits_clf, grey, 8)
    assert m["fa_in_distribution"] == 0.0 and m["ood_rate"] == 1.0
    if fooled < 0.5:
        pytest.skip(f"this classifier is not fooled by grey (argmax 8 on {fooled:.0%}); nothing to contrast")


def test_calibration_round_trips_through_the_classifier_folder(digits_clf):
    clf, cal, held = digits_clf
    assert (clf.path / CALIBRATION_FILE).is_file()
    loaded = load_calibration(clf.path)
    assert loaded.record == cal.record and loaded.threshold == cal.threshold
    for a, b in zip(loaded.precisions + loaded.means, cal.precisions + cal.means):
        assert torch.equal(a, b)
    images = held.get_batch(torch.arange(40))[0]
    assert torch.equal(loaded.inside(clf, images), cal.inside(clf, images))
    fit, _ = calibration_sets(clf, load_dataset("digits", split="train"))
    again = calibration_for(clf, fit, held)
    assert again.record == cal.record  # reused, not recomputed (same settings)


def test_calibration_is_redone_when_its_settings_differ(digits_clf):
    clf, cal, held = digits_clf
    fit, _ = calibration_sets(clf, load_dataset("digits", split="train"))
    other = calibration_for(clf, fit, held, keep=0.95)
    assert other.record["keep"] == 0.95 and other.threshold < cal.threshold
    assert load_calibration(clf.path).record["keep"] == 0.95
    calibration_for(clf, fit, held)  # back to the default for the other tests
