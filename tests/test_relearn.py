"""`relearn` on the tiny model: the curve, steps to relearn, the outputs, and a killed run that resumes bitwise."""

from __future__ import annotations

import pytest

from diffusion_unlearn.cli import main
from diffusion_unlearn.config import RelearnConfig, SamplerConfig, build_config
from diffusion_unlearn.eval.classifier import ClassifierConfig, train_classifier
from diffusion_unlearn.fileio import UserError, read_json
from diffusion_unlearn.relearn import parse_shots, relearn, steps_to_relearn


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return train_classifier(ClassifierConfig(out=str(tmp_path_factory.mktemp("clf") / "digits"), epochs=1, seed=0,
                                             device="cpu"))


def _cfg(model, classifier, out, **kw):
    base = dict(model=str(model), forget_class=3, classifier=str(classifier), out=str(out), shots="0,2", max_steps=4,
                probe_every=2, probe_samples=4, batch_size=8, checkpoint_every=1,
                sampler=SamplerConfig(steps=2, sample_batch_size=64))
    base.update(kw)
    return build_config(RelearnConfig, base)


def test_steps_to_relearn_is_the_first_probe_at_the_threshold():
    curve = [{"step": s, "fa_in_distribution": v} for s, v in [(0, 0.0), (10, 0.49), (20, 0.5), (30, 0.9)]]
    assert steps_to_relearn(curve, 0.5) == 20
    assert steps_to_relearn(curve[:3], 0.6) is None
    assert steps_to_relearn([{"step": 0, "fa_in_distribution": 1.0}], 0.5) == 0  # a model that never forgot


def test_shots_are_checked():
    assert parse_shots("0,1,5,25") == [0, 1, 5, 25]
    for bad in ("", "1,1", "-1", "a"):
        with pytest.raises(UserError):
            parse_shots(bad)


def test_curve_steps_to_relearn_and_outputs(tiny_model, classifier, tmp_path, monkeypatch):
    values = iter([0.0, 0.2, 0.7, 0.0, 0.5, 0.1])  # K=0 probes at steps 0, 2, 4; then K=2

    def scripted(*args):
        return lambda pipeline: {"fa": 1.0, "fa_in_distribution": next(values), "ood_rate": 0.0}

    monkeypatch.setattr("diffusion_unlearn.relearn.relearn_probe", scripted)
    result = relearn(_cfg(tiny_model, classifier, tmp_path / "r"))
    k0, k2 = result["variants"]
    assert [p["step"] for p in k0["curve"]] == [0, 2, 4] and k0["steps_to_relearn"] == 4
    assert k2["steps_to_relearn"] == 2 and k2["relearned"]
    assert k0["data"] == "retained classes" and k2["data"] == "2 forgotten-class images"
    for name in ("relearn.json", "relearn.png", "relearn.md", "k0/result.json", "k2/result.json"):
        assert (tmp_path / "r" / name).is_file(), name
    assert not (tmp_path / "r" / "k2" / "state.pt").exists()
    md = (tmp_path / "r" / "relearn.md").read_text()
    assert "| retained classes | 4 |" in md and "| 2 forgotten-class images | 2 |" in md
    assert read_json(tmp_path / "r" / "relearn.json")["variants"][1]["steps_to_relearn"] == 2


class _Kill(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_model, classifier, tmp_path):
    """The real probe (classifier, OOD calibration, sampling); killed in the K=2 variant after step 3."""
    full = relearn(_cfg(tiny_model, classifier, tmp_path / "full"))

    def kill(shots, step):
        if shots == 2 and step == 3:
            raise _Kill

    with pytest.raises(_Kill):
        relearn(_cfg(tiny_model, classifier, tmp_path / "resumed"), callback=kill)
    assert (tmp_path / "resumed" / "k2" / "state.pt").is_file() and (tmp_path / "resumed" / "k0" / "result.json").is_file()
    resumed = relearn(_cfg(tiny_model, classifier, tmp_path / "resumed"))
    for a, b in zip(full["variants"], resumed["variants"]):
        assert a["weights_sha256"] == b["weights_sha256"] and a["curve"] == b["curve"]
    assert {"fa", "fa_in_distribution", "ood_rate"} <= set(full["variants"][0]["curve"][0])
    # other settings refuse the unfinished or finished variants in one line
    with pytest.raises(UserError, match="made with other settings"):
        relearn(_cfg(tiny_model, classifier, tmp_path / "resumed", lr=1e-3))


def test_cli_needs_a_classifier(tiny_model, tmp_path, capsys):
    assert main(["relearn", "--model", str(tiny_model), "--out", str(tmp_path / "r")]) == 2
    assert "relearn needs --classifier" in capsys.readouterr().err
