"""The demo reuses a finished unlearning run only when it was made from the demo's base model with the demo's
settings, and refuses a cached base model trained with other settings in one line that names the demo's fix."""

import json
import shutil
from dataclasses import replace

import pytest

from diffusion_unlearn.config import ForgetConfig, PretrainConfig, SamplerConfig, build_config
from diffusion_unlearn.demo import finished_run_reusable
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.modelfolder import META_FILE
from diffusion_unlearn.pretrain import pretrain
from diffusion_unlearn.unlearn import OutputPaths, forget


def test_a_finished_run_is_reused_only_from_the_same_base_and_settings(tiny_model, tmp_path):
    cfg = build_config(ForgetConfig, dict(model=str(tiny_model), dataset="digits", forget_class=3,
                                          out=str(tmp_path / "run"), iterations=2, batch_size=16,
                                          fisher_batch_size=64, fisher_max_batches=1, grid_per_class=1,
                                          sampler=SamplerConfig(steps=2, sample_batch_size=64)))
    paths = OutputPaths(tmp_path / "run")
    assert not finished_run_reusable(paths, cfg, tiny_model)  # nothing there yet: run it
    forget(cfg)
    assert finished_run_reusable(paths, cfg, tiny_model)
    with pytest.raises(UserError, match=r"iterations 2 \(now 3\).*delete .*run or pass another --out"):
        finished_run_reusable(paths, replace(cfg, iterations=3), tiny_model)
    retrained = tmp_path / "retrained-base"  # the same folder name, trained anew (other history)
    shutil.copytree(tiny_model, retrained)
    meta = json.loads((retrained / META_FILE).read_text())
    (retrained / META_FILE).write_text(json.dumps({**meta, "history": [{"op": "pretrain", "iterations": 600}]}))
    with pytest.raises(UserError, match="unlearned from another base model"):
        finished_run_reusable(paths, cfg, retrained)


def test_a_cached_base_trained_otherwise_names_the_demo_s_fix(tmp_path):
    cfg = build_config(PretrainConfig, dict(dataset="digits", model_preset="tiny", iterations=2, batch_size=8,
                                            out=str(tmp_path / "base"), cache_dir=str(tmp_path / "cache")))
    pretrain(cfg)
    with pytest.raises(UserError, match=r"iterations 2 \(now 3\); delete .*base or pass another --cache-dir"):
        pretrain(replace(cfg, iterations=3), reuse_hint=f"delete {tmp_path / 'base'} or pass another --cache-dir")
