"""The user's path through the CLI on tiny models: pretrain (+ resume, retrain baseline) → classifier → eval."""

import json

import pytest
import torch
from safetensors.torch import load_file

from builders import killed_pretrain_resumes
from diffusion_unlearn.cli import main
from diffusion_unlearn.modelfolder import load_model_folder

pytestmark = pytest.mark.slow  # the user's whole CLI path, end to end

TINY = ["--model-preset", "tiny", "--iterations", "12", "--checkpoint-every", "4", "--batch-size", "16",
        "--lr-schedule", "cosine", "--warmup-iterations", "3"]  # the resumed run must continue the schedule


def _weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "model"
    assert main(["pretrain", "--out", str(out), *TINY]) == 0
    return out


def test_pretrain_writes_a_described_model_folder(base):
    meta = json.loads((base / "diffusion_unlearn.json").read_text())
    assert meta["weights"] == "ema" and meta["num_classes"] == 10 and meta["class_names"][3] == "3"
    assert meta["null_class"] == 10 and meta["dataset"] == "digits" and meta["excluded_classes"] == []
    training = json.loads((base / "training.json").read_text())
    assert training["iterations"] == 12 and not (base / "training_state.pt").exists()


def test_pretrain_resumes_bitwise_after_a_kill(base, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    killed_pretrain_resumes(monkeypatch, ["pretrain", "--out", str(out), *TINY], kill_after=6)  # checkpoint at 4
    a, b = _weights(base), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_pretrain_is_reused(base):
    before = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main(["pretrain", "--out", str(base), *TINY]) == 0
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_retrain_baseline_excludes_a_class(tmp_path):
    out = tmp_path / "retrain"
    assert main(["pretrain", "--out", str(out), "--exclude-class", "4", *TINY[:2], "--iterations", "2"]) == 0
    assert load_model_folder(out).meta.excluded_classes == [4]
    assert main(["pretrain", "--out", str(tmp_path / "x"), "--exclude-class", "10"]) == 2


def test_classifier_and_eval_json(base, tmp_path, capsys):
    clf = tmp_path / "clf"
    assert main(["train-classifier", "--dataset", "digits", "--out", str(clf), "--epochs", "2"]) == 0
    out = tmp_path / "metrics.json"
    code = main(["eval", "--model", str(base), "--dataset", "digits", "--forget-class", "2", "--classifier", str(clf),
                 "--fa-samples", "12", "--retain-samples-per-class", "4", "--steps", "2", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    m = json.loads(out.read_text())
    for key in ("fa", "retain_accuracy", "fid", "fid_feature_extractor", "fa_samples", "retain_samples",
                "sampler", "steps", "guidance_scale", "guidance_w", "protocol", "forget_mean_prob",
                "forget_mean_entropy"):
        assert key in m, key
    assert 0 <= m["fa"] <= 1 and 0 <= m["retain_accuracy"] <= 1 and m["fid"] > 0
    assert m["fa_samples"] == 12 and m["retain_samples"] == 36 and m["guidance_w"] == 2.0
    assert "penultimate" in m["fid_feature_extractor"]
    # a forgotten class the model does not have: one-line error, no sampling
    capsys.readouterr()
    code = main(["eval", "--model", str(base), "--forget-class", "11", "--classifier", str(clf),
                 "--out", str(tmp_path / "bad.json")])
    assert code == 2 and "outside the model's classes" in capsys.readouterr().err


def test_eval_inception_without_weights_fails_before_sampling(base, tmp_path, capsys):
    clf = tmp_path / "clf"
    main(["train-classifier", "--dataset", "digits", "--out", str(clf), "--epochs", "1"])
    code = main(["eval", "--model", str(base), "--classifier", str(clf), "--fid-extractor", "inception",
                 "--fid-weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.json")])
    assert code == 2 and "--fid-weights" in capsys.readouterr().err
