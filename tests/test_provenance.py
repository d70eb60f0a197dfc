"""Provenance-checked reuse and checks before work: every reused artefact with one changed setting is refused (the
message names the setting and both values), with the same settings is reused, and `--restart` starts over; bad
options, unwritable places and faults end in one line, before work or keeping what was done."""

import errno
import json
import shutil

import pytest
import torch

from diffusion_unlearn import preflight
from diffusion_unlearn.cli import main
from diffusion_unlearn.config import ForgetConfig, PretrainConfig, SamplerConfig, StudyConfig, build_config
from diffusion_unlearn.data import forget_retain_split, load_dataset
from diffusion_unlearn.fileio import UserError, WriteError, read_json, write_json
from diffusion_unlearn.methods.sa import FISHER_FILE, REPLAY_FILE, SelectiveAmnesia
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.pretrain import pretrain
from diffusion_unlearn.provenance import FORMAT_VERSION, Provenance, check_reuse, settings_of, state_record
from diffusion_unlearn.unlearn import forget


def _cfg(model, out, **kw):
    base = dict(model=str(model), dataset="digits", forget_class=3, out=str(out), iterations=3, batch_size=16,
                fisher_batch_size=64, fisher_max_batches=1, checkpoint_every=1, grid_per_class=1, grid_classes="3",
                steps=2, sample_batch_size=64)
    base.update(kw)
    return build_config(ForgetConfig, base)


class _Kill(Exception):
    pass


def _killed(iteration_at: int):
    def kill(iteration, phase):
        if iteration == iteration_at and phase == "forget":
            raise _Kill
    return kill


def _log_iterations(run):
    return [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the record


def test_check_reuse_names_each_difference_and_ignores_settings_without_effect():
    old = Provenance("forget-state", settings_of(_cfg("m", "a")))
    same = Provenance("forget-state", settings_of(_cfg("m", "b", device="cpu", checkpoint_every=7, restart=True)))
    check_reuse(old, same, "state.pt")
    changed = Provenance("forget-state", settings_of(_cfg("m", "a", forget_lr=1e-3, iterations=5)))
    with pytest.raises(UserError) as e:
        check_reuse(old, changed, "run/state.pt")
    message = str(e.value)
    assert "forget_optimizer.lr 0.0001 (now 0.001)" in message and "iterations 3 (now 5)" in message
    assert "run/state.pt" in message and "--restart" in message and "\n" not in message
    assert "sampler.steps" in settings_of(_cfg("m", "a"))  # nested sections are dotted
    with pytest.raises(UserError, match="is a mask, not a forget-state"):
        check_reuse(Provenance("mask", old.settings), old, "x")
    with pytest.raises(UserError, match="records no settings"):
        check_reuse(None, old, "x")
    with pytest.raises(UserError, match="format version 0"):
        check_reuse(Provenance("forget-state", old.settings, 0), old, "x", check_version=True)
    assert Provenance.from_json(old.to_json()) == old


# ----------------------------------------------------------------------------- forget: state and mask


def test_forget_resume_refuses_other_settings_resumes_same_and_restart_starts_over(tiny_model, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Kill):
        forget(_cfg(tiny_model, run), callback=_killed(2))
    assert state_record(run / "state.pt").format_version == FORMAT_VERSION
    for change, named in [(dict(forget_lr=1e-3), "forget_optimizer.lr 0.0001 (now 0.001)"),
                          (dict(iterations=5), "iterations 3 (now 5)"),
                          (dict(method="salun"), "method 'sfron' (now 'salun')")]:
        with pytest.raises(UserError, match=named.replace("(", r"\(").replace(")", r"\)")):
            forget(_cfg(tiny_model, run, **change))
    assert torch.load(run / "state.pt", weights_only=True)["iteration"] == 2  # the refused runs changed nothing
    forget(_cfg(tiny_model, run, device="cpu", checkpoint_every=2))  # settings without effect may differ
    assert _log_iterations(run) == [0, 1, 2]

    with pytest.raises(UserError, match="already holds a finished run.*--restart"):
        forget(_cfg(tiny_model, run, forget_lr=1e-3))
    forget(_cfg(tiny_model, run, forget_lr=1e-3, restart=True))
    assert _log_iterations(run) == [0, 1, 2]
    assert read_json(run / "model" / "diffusion_unlearn.json")["history"][-1]["provenance"]["settings"][
        "forget_optimizer.lr"] == 1e-3
    assert "restart: false" in (run / "config.yaml").read_text()  # passed back with --config, it does not discard


def test_resume_prints_where_it_resumes(tiny_model, tmp_path, capsys):
    with pytest.raises(_Kill):
        forget(_cfg(tiny_model, tmp_path / "run"), callback=_killed(2))
    capsys.readouterr()
    forget(_cfg(tiny_model, tmp_path / "run"))
    assert f"resuming {tmp_path / 'run'} from iteration 2 of 3" in capsys.readouterr().err


def test_run_mask_is_reused_only_with_its_settings(tiny_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with pytest.raises(_Kill):  # killed before the first state: only the mask (and config) are left
        forget(_cfg(tiny_model, run), callback=_killed(0))
    assert (run / "mask.safetensors").exists() and not (run / "state.pt").exists()
    with pytest.raises(UserError, match=r"mask.gamma 3.0 \(now 5.0\)"):
        forget(_cfg(tiny_model, run, gamma=5.0))
    with pytest.raises(UserError, match="method ga uses none"):
        forget(_cfg(tiny_model, run, method="ga"))
    monkeypatch.setattr("diffusion_unlearn.unlearn.compute_mask",
                        lambda *a, **k: pytest.fail("a mask of the same settings must be reused"))
    forget(_cfg(tiny_model, run))
    assert _log_iterations(run) == [0, 1, 2]


# ----------------------------------------------------------------------------- pretrain, SA, study


def test_finished_pretrain_is_reused_only_with_its_training_config(tmp_path):
    args = ["pretrain", "--out", str(tmp_path / "base"), "--model-preset", "tiny", "--iterations", "2",
            "--batch-size", "8"]
    assert main(args) == 0
    weights = tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main([*args, "--device", "cpu"]) == 0 and weights.stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"lr 0.001 \(now 0.002\)"):
        pretrain(PretrainConfig(out=str(tmp_path / "base"), model_preset="tiny", iterations=2, batch_size=8, lr=2e-3))
    assert main([*args, "--lr", "0.002", "--restart"]) == 0 and weights.stat().st_mtime_ns != before
    assert read_json(tmp_path / "base" / "training.json")["provenance"]["settings"]["lr"] == 0.002


def test_sa_replay_and_fisher_are_reused_only_with_their_settings(tmp_path, monkeypatch):
    torch.manual_seed(0)
    from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet

    backbone = DDPMBackbone(ClassConditionalUNet.from_preset("tiny"))
    forget_set, retain_set = forget_retain_split(load_dataset("digits", None, "train"), 3)
    sampler = SamplerConfig(sampler="ddim", steps=2, guidance_scale=3.0, sample_batch_size=64)
    sa = dict(forget_class=3, sa_samples_per_class=1, sa_fisher_timesteps=2, sa_fisher_chunk=2, sampler=sampler)
    SelectiveAmnesia(**sa).prepare(backbone, forget_set, retain_set, tmp_path)
    assert (tmp_path / REPLAY_FILE).exists() and (tmp_path / FISHER_FILE).exists()
    with pytest.raises(UserError, match=r"samples_per_class 1 \(now 2\)"):
        SelectiveAmnesia(**{**sa, "sa_samples_per_class": 2}).prepare(backbone, forget_set, retain_set, tmp_path)
    with pytest.raises(UserError, match=r"sampler.sample_seed 0 \(now 1\)"):
        SelectiveAmnesia(**{**sa, "sampler": SamplerConfig(**{**vars(sampler), "sample_seed": 1})}).prepare(
            backbone, forget_set, retain_set, tmp_path)
    weight = next(iter(backbone.named_parameters().values()))
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # other base weights
    with pytest.raises(UserError, match="base_weights_sha256"):
        SelectiveAmnesia(**sa).prepare(backbone, forget_set, retain_set, tmp_path)
    with torch.no_grad():
        weight.copy_(original)
    monkeypatch.setattr(DDPMBackbone, "generate", lambda *a, **k: pytest.fail("the replay must be reused"))
    monkeypatch.setattr("diffusion_unlearn.methods.sa.timestep_summed_fisher",
                        lambda *a, **k: pytest.fail("the Fisher must be reused"))
    SelectiveAmnesia(**{**sa, "ewc_lambda": 3.0}).prepare(backbone, forget_set, retain_set, tmp_path)


def test_study_scores_are_reused_only_with_their_settings(tiny_model, tmp_path):
    from diffusion_unlearn.study import reused_json, study_record

    cfg = StudyConfig(model=str(tiny_model), classifier="clf", out=str(tmp_path))
    record = study_record(cfg, "study-scores", forget_class=3)
    write_json(tmp_path / "class-3.json", {"fa": 0.5, "provenance": record.to_dict()})
    assert reused_json(tmp_path / "class-3.json", study_record(StudyConfig(**{**vars(cfg), "jobs": 2, "seeds": "1"}),
                                                               "study-scores", forget_class=3))["fa"] == 0.5
    other = study_record(StudyConfig(**{**vars(cfg), "fa_samples": 7}), "study-scores", forget_class=3)
    with pytest.raises(UserError, match=r"fa_samples 100 \(now 7\)"):
        reused_json(tmp_path / "class-3.json", other)
    assert reused_json(tmp_path / "missing.json", record) is None


def test_study_shared_mask_is_named_by_its_settings(tmp_path):
    from diffusion_unlearn.study import Cell, shared_artifacts

    cfg = StudyConfig(model="m", classifier="c", methods="sfron")
    a = shared_artifacts(cfg, Cell("sfron", "dual", 3, 0), tmp_path)
    b = shared_artifacts(StudyConfig(**{**vars(cfg), "model": "other"}), Cell("sfron", "dual", 3, 0), tmp_path)
    c = shared_artifacts(cfg, Cell("sfron", "shared", 3, 0, forget_lr=1e-3), tmp_path)
    assert a.files != b.files and a.files == c.files  # the optimizer setup and lr do not change a mask


# ----------------------------------------------------------------------------- checks before work


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    # forget and eval load through modelfolder.load_model_and_data. `sample` first: patching it imports it, and an
    # import after modelfolder's patch would bind the refusal as its "original", left in place after the test
    for module in ("sample", "modelfolder"):
        monkeypatch.setattr(f"diffusion_unlearn.{module}.load_model_folder", refuse)


@pytest.mark.parametrize("change, message", [
    (dict(iterations=0), r"iterations: must be at least 1 \(got 0\)"),
    (dict(iterations=-5), r"iterations: must be at least 1 \(got -5\)"),
    (dict(batch_size=0), r"batch_size: must be at least 1 \(got 0\)"),
    (dict(fisher_batch_size=0), "mask.fisher_batch_size: must be at least 1"),
])
def test_bad_counts_are_refused_before_loading(tiny_model, tmp_path, no_model_loading, change, message):
    with pytest.raises(UserError, match=message):  # the config refuses them: nothing is loaded or written
        forget(_cfg(tiny_model, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_unwritable_out_and_full_disk_are_refused_before_loading(tiny_model, tmp_path, no_model_loading,
                                                                 monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        forget(_cfg(tiny_model, tmp_path / "file" / "run"))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(UserError, match=r"--out .*needed for 12× state.pt.*free"):
        forget(_cfg(tiny_model, tmp_path / "run"))
    code = main(["eval", "--model", str(tiny_model), "--classifier", "clf", "--out", str(tmp_path / "file" / "m.json")])
    assert code == 2


def test_sample_per_class_zero_is_refused(tiny_model, tmp_path, no_model_loading):
    assert main(["sample", "--model", str(tiny_model), "--per-class", "0", "--grid", str(tmp_path / "g.png")]) == 2
    assert not (tmp_path / "g.png").exists()


# ----------------------------------------------------------------------------- honest failures


def test_nonfinite_loss_at_the_start_says_no_state_was_saved(tiny_model, tmp_path, monkeypatch):
    from diffusion_unlearn.methods.sfron import SFRon

    monkeypatch.setattr(SFRon, "forget_loss", lambda self, backbone, x, y: torch.tensor(float("nan")))
    with pytest.raises(UserError) as e:
        forget(_cfg(tiny_model, tmp_path / "run"))
    assert "at iteration 0" in str(e.value) and "no state was saved" in str(e.value) and "--restart" in str(e.value)
    assert not (tmp_path / "run" / "state.pt").exists()


def test_full_disk_during_forget_is_one_line_naming_the_last_state(tiny_model, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(WriteError) as e:
        forget(_cfg(tiny_model, run))
    message = str(e.value)
    assert f"cannot write {run / 'state.pt'}" in message and "after 1 iterations" in message and "\n" not in message
    assert torch.load(run / "state.pt", weights_only=True)["iteration"] == 1  # the last good state is kept


def test_eval_prints_its_metrics_when_out_cannot_be_written(tiny_model, tmp_path, monkeypatch, capsys):
    import diffusion_unlearn.eval.evaluate as evaluate_module

    def read_only(path, obj):
        raise WriteError(f"cannot write {path}: Read-only file system; choose a folder you can write to")

    monkeypatch.setattr(evaluate_module, "write_json", read_only)
    monkeypatch.setattr(evaluate_module, "store_metrics", lambda *a, **k: {"fa": 0.25, "per_class_accuracy": {}})
    monkeypatch.setattr(evaluate_module, "load_classifier", lambda *a, **k: type("C", (), {"meta": {}})())
    monkeypatch.setattr(evaluate_module, "check_classifier_classes", lambda *a: None)
    from diffusion_unlearn.config import EvalConfig

    with pytest.raises(WriteError, match="printed to stdout"):
        evaluate_module.evaluate(EvalConfig(model=str(tiny_model), classifier="clf", out=str(tmp_path / "m.json")))
    assert json.loads(capsys.readouterr().out)["fa"] == 0.25


def test_invalid_model_json_is_one_line_naming_the_file(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "diffusion_unlearn.json").write_text("{not json")
    assert main(["sample", "--model", str(broken), "--grid", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "diffusion_unlearn.json is not valid JSON" in err and "Traceback" not in err


def test_pickle_hints_name_only_options_the_command_has(tiny_model, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(UserError) as e:
        forget(_cfg(tiny_model, tmp_path / "run", mask=str(notes)))
    assert "as a PyTorch checkpoint" in str(e.value) and "--trust-pickle" not in str(e.value)
    for extra in ([], ["--trust-pickle"]):
        assert main(["convert", str(notes), "--out", str(tmp_path / "model"), *extra]) == 2
        err = capsys.readouterr().err
        assert "as a PyTorch checkpoint" in err and "--trust-pickle" not in err and "Traceback" not in err


def test_write_errors_are_one_line_naming_path_and_cause(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diffusion_unlearn.fileio.tempfile.mkstemp", no_space)
    with pytest.raises(WriteError, match=r"cannot write .*x.json: No space left on device; free some disk space"):
        write_json(tmp_path / "x.json", {})
