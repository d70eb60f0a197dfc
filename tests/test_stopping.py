"""`forget --until-forgotten` (stopping.py): the stop rule exactly, the cap, resume to the same stop iteration,
and probing that leaves the trained weights bitwise unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusion_unlearn.config import ForgetConfig, SamplerConfig, build_config
from diffusion_unlearn.eval.classifier import ClassifierConfig, train_classifier
from diffusion_unlearn.fileio import UserError, read_json
from diffusion_unlearn.stopping import CAP, TARGET_MET, StopRule, UntilForgotten, report_section
from diffusion_unlearn.unlearn import alpha_at, forget

WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return train_classifier(ClassifierConfig(out=str(tmp_path_factory.mktemp("clf") / "digits"), epochs=1, seed=0,
                                             device="cpu"))


def _cfg(model, classifier, out, **kw):
    base = dict(model=str(model), dataset="digits", forget_class=3, out=str(out), batch_size=16,
                fisher_batch_size=64, fisher_max_batches=2, checkpoint_every=1, grid_per_class=1, grid_classes="3",
                sampler=SamplerConfig(steps=2, sample_batch_size=64), until_forgotten=True,
                classifier=str(classifier), probe_every=1, probe_samples=4, probe_retain_per_class=1,
                max_iterations=8)
    base.update(kw)
    return build_config(ForgetConfig, base)


class _Script:
    """A probe measure that returns scripted fa_in_distribution values by iterations done (not by call count, so
    that a resumed run, which replays its early probes from the log, sees the same script)."""

    def __init__(self, values: dict[int, float]):
        self.values, self.done, self.calls = values, 0, []

    def step(self, iteration: int, phase: str) -> None:  # the loop's step callback: iterations done after it
        self.done = iteration + 1

    def measure(self, pipeline) -> dict:
        self.calls.append(self.done)
        v = self.values[self.done]
        return {"fa": v, "fa_in_distribution": v, "ood_rate": 0.0, "retain_accuracy": 1.0}


@pytest.fixture
def script(monkeypatch):
    def install(values):
        s = _Script(values)
        monkeypatch.setattr("diffusion_unlearn.unlearn.probe_measure", lambda *a: s.measure)
        return s
    return install


def _log(run) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_stop_rule_needs_the_target_on_consecutive_probes():
    rule = StopRule(0.01)
    p = lambda v: {"fa_in_distribution": v}  # noqa: E731
    assert not rule.met([p(0.0)])
    assert not rule.met([p(0.0), p(0.02)])
    assert not rule.met([p(0.0), p(0.5), p(0.01)])
    assert rule.met([p(0.5), p(0.01), p(0.0)])  # at the target counts
    assert StopRule(0.01, consecutive=3).met([p(0.0)] * 3) and not StopRule(0.01, consecutive=3).met([p(0.0)] * 2)


def test_stops_when_the_target_holds_twice(tiny_model, classifier, tmp_path, script):
    # holds at 2, not at 3, holds at 4 and 5: stops after 5 iterations, never probing 6
    s = script({1: 0.5, 2: 0.0, 3: 0.3, 4: 0.01, 5: 0.0, 6: 0.0, 7: 0.0, 8: 0.0})
    run = tmp_path / "run"
    result = forget(_cfg(tiny_model, classifier, run), callback=s.step)
    assert s.calls == [1, 2, 3, 4, 5]
    log = _log(run)
    assert [r["iteration"] for r in log] == [0, 1, 2, 3, 4]
    assert [r.get("stop") for r in log] == [None, None, None, None, TARGET_MET]
    assert [r["stop_probe"]["target_met"] for r in log] == [False, True, False, True, True]
    # α's cosine runs over max_iterations, whatever the stop
    assert [r["alpha"] for r in log] == [alpha_at(k, 8, 1.0, "cosine") for k in range(5)]
    stopping = read_json(run / "stopping.json")
    assert stopping == result["stopping"]
    assert stopping["forgotten"] is True and stopping["stop_iteration"] == 5
    assert [p["iteration"] for p in stopping["curve"]] == [1, 2, 3, 4, 5]
    assert read_json(run / "model" / "diffusion_unlearn.json")["history"][-1]["iterations"] == 5
    assert not (run / "state.pt").exists()
    assert "Stopped after **5** iterations" in report_section(stopping)


def test_cap_ends_not_forgotten_with_a_warning(tiny_model, classifier, tmp_path, script, capsys):
    s = script({k: 0.5 for k in range(1, 5)})
    run = tmp_path / "run"
    result = forget(_cfg(tiny_model, classifier, run, probe_every=3, max_iterations=4), callback=s.step)
    assert s.calls == [3, 4]  # every 3rd iteration and the last
    assert [r.get("stop") for r in _log(run)] == [None, None, None, CAP]
    stopping = result["stopping"]
    assert stopping["forgotten"] is False and stopping["stop_iteration"] == 4
    assert read_json(run / "stopping.json")["forgotten"] is False
    assert "NOT FORGOTTEN" in capsys.readouterr().err
    assert report_section(stopping).splitlines()[2].startswith("**warning: NOT FORGOTTEN")


class _Kill(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_stop_iteration(tiny_model, classifier, tmp_path, script):
    values = {1: 0.5, 2: 0.0, 3: 0.3, 4: 0.0, 5: 0.0, 6: 0.0, 7: 0.0, 8: 0.0}
    s = script(values)
    forget(_cfg(tiny_model, classifier, tmp_path / "full", checkpoint_every=2), callback=s.step)

    s = script(values)

    def kill(iteration, phase):
        s.step(iteration, phase)
        if iteration == 4 and phase == "retain":  # in the iteration that would stop the run
            raise _Kill

    with pytest.raises(_Kill):
        forget(_cfg(tiny_model, classifier, tmp_path / "resumed", checkpoint_every=2), callback=kill)
    s = script(values)
    forget(_cfg(tiny_model, classifier, tmp_path / "resumed", checkpoint_every=2), callback=s.step)
    assert s.calls == [5]  # iterations 1-4 resumed from state.pt (4 iterations) and replayed from the log
    a, b = load_file(tmp_path / "full" / WEIGHTS), load_file(tmp_path / "resumed" / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(_log(tmp_path / "full")) == strip(_log(tmp_path / "resumed"))
    assert read_json(tmp_path / "resumed" / "stopping.json")["stop_iteration"] == 5


@pytest.mark.slow
def test_a_run_killed_after_its_stop_resumes_without_another_iteration(tiny_model, classifier, tmp_path, script,
                                                                       monkeypatch):
    s = script({1: 0.0, 2: 0.0})
    monkeypatch.setattr("diffusion_unlearn.unlearn.finish", lambda *a: (_ for _ in ()).throw(_Kill()))
    with pytest.raises(_Kill):  # after the loop stopped and the state was saved, before the outputs
        forget(_cfg(tiny_model, classifier, tmp_path / "run"), callback=s.step)
    monkeypatch.undo()
    s = script({})
    result = forget(_cfg(tiny_model, classifier, tmp_path / "run"), callback=s.step)
    assert s.calls == [] and result["stopping"]["stop_iteration"] == 2


@pytest.mark.slow
def test_probing_leaves_the_weights_bitwise_unchanged(tiny_model, classifier, tmp_path):
    """The real probe (classifier, OOD calibration, sampling) stops the run at iteration s; an unprobed run of the
    same horizon, killed after s iterations, holds the same weights in its state."""
    cfg = _cfg(tiny_model, classifier, tmp_path / "probed", probe_every=2, max_iterations=6, target_fa=0.99)
    stopping = forget(cfg)["stopping"]
    assert stopping["stop_iteration"] == 4 and stopping["forgotten"] is True
    assert {"fa", "fa_in_distribution", "ood_rate", "retain_accuracy"} <= set(stopping["curve"][0])

    def kill(iteration, phase):
        if iteration == 4:
            raise _Kill

    with pytest.raises(_Kill):
        forget(_cfg(tiny_model, classifier, tmp_path / "plain", until_forgotten=False, iterations=6), callback=kill)
    plain = torch.load(tmp_path / "plain" / "state.pt", weights_only=True)
    assert plain["iteration"] == 4
    probed = load_file(tmp_path / "probed" / WEIGHTS)
    assert all(torch.equal(plain["model"][k], probed[k]) for k in probed)


def test_until_forgotten_needs_a_classifier_before_any_work(tiny_model, tmp_path):
    with pytest.raises(UserError, match="--until-forgotten needs --classifier"):
        build_config(ForgetConfig, {"model": str(tiny_model), "until_forgotten": True})
    cfg = build_config(ForgetConfig, {"model": str(tiny_model), "until_forgotten": True, "out": str(tmp_path / "o"),
                                      "classifier": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="is not a classifier folder"):
        forget(cfg)
    assert not (tmp_path / "o").exists()


def test_a_plain_run_records_no_stop_settings():
    from diffusion_unlearn.unlearn import run_record

    plain = run_record(build_config(ForgetConfig, {"probe_every": 7}))
    assert not {"until_forgotten", "probe_every", "classifier"} & set(plain.settings)
    until = run_record(build_config(ForgetConfig, {"until_forgotten": True, "classifier": "c"}))
    assert until.settings["until_forgotten"] is True and until.settings["max_iterations"] == 1000


def test_replay_restores_the_curve_and_the_decision():
    stopper = UntilForgotten(StopRule(0.01), lambda: {}, every=1, cap=9)
    point = {"fa": 0.0, "fa_in_distribution": 0.0, "ood_rate": 0.0, "retain_accuracy": 1.0, "target_met": True}
    stopper.replay([{"iteration": 0}, {"iteration": 1, "stop_probe": point},
                    {"iteration": 2, "stop_probe": point, "stop": TARGET_MET}])
    assert [p["iteration"] for p in stopper.curve] == [2, 3] and stopper.reason == TARGET_MET


def test_the_stop_probe_scores_what_eval_scores(tiny_model, classifier, tmp_path):
    """The probe judges its samples as `eval` judges its stored ones (clamped to [-1, 1], uint8): on a model whose
    raw samples leave [-1, 1] (an untrained one), a probe that saw raw floats would call images out-of-distribution
    that every saved image shows in range (the first second-edition study cells stopped "forgotten" at
    fa_in_distribution 0.0 where `eval` measured 0.84)."""
    from diffusion_unlearn.data import load_dataset
    from diffusion_unlearn.eval.classifier import load_classifier
    from diffusion_unlearn.eval.evaluate import sample_metrics
    from diffusion_unlearn.eval.ood import calibration_for, calibration_sets
    from diffusion_unlearn.modelfolder import load_model_folder
    from diffusion_unlearn.pipelines.sampling import generate
    from diffusion_unlearn.sampler_defaults import resolve_sampler
    from diffusion_unlearn.stopping import forgetting_probe

    loaded = load_model_folder(tiny_model)
    sampler = resolve_sampler(SamplerConfig(steps=2, sample_batch_size=64), loaded.meta.backbone, "eval", "cpu")
    images = generate(loaded.pipeline, [3], 8, sampler, progress=False)[0]
    assert images.abs().max() <= 1 and (images.abs() == 1).any()  # clamped: the raw samples were out of range
    clf, train = load_classifier(classifier), load_dataset("digits", split="train")
    cal = calibration_for(clf, *calibration_sets(clf, train))
    probe = forgetting_probe(clf, cal, 3, 10, 8, 2, sampler)(loaded.pipeline)
    evaluated = sample_metrics(loaded.pipeline, train, clf, 3, 8, 2, sampler, fid_extractor="classifier",
                               cache_dir=str(tmp_path), ood=cal, progress=False)
    for key in ("fa", "fa_in_distribution", "ood_rate", "retain_accuracy"):
        assert probe[key] == pytest.approx(evaluated[key], abs=1e-12), key
