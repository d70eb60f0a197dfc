"""SA's published `fisher_dict.pkl` (a plain `pickle.dump` of CUDA tensors, `module.` keys; reference §2.3):
imported on the CPU by a restricted unpickler, used by `forget --method sa --sa-fisher FILE`."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from diffusion_unlearn.cli import main
from diffusion_unlearn.config import ConvertConfig, ForgetConfig, build_config
from diffusion_unlearn.convert import convert
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.methods.sa import SelectiveAmnesia, save_fisher
from diffusion_unlearn.modelfolder import load_model_folder
from diffusion_unlearn.pickled_tensors import load_tensor_pickle
from diffusion_unlearn.unlearn import forget


def _dump_as_from_cuda(obj, path, monkeypatch) -> None:
    """`pickle.dump` as SA's `fim.py` writes it, each storage's embedded `torch.save` naming device cuda:0."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        with open(path, "wb") as f:
            pickle.dump(obj, f)


@pytest.fixture
def fisher_of_tiny(tiny_model):
    """A random non-negative Fisher over the tiny model's trainable parameters, keys as SA writes them."""
    torch.manual_seed(1)
    params = {n: p for n, p in load_model_folder(tiny_model).denoiser.named_parameters() if p.requires_grad}
    return {f"module.{n}": torch.rand_like(p) for n, p in params.items()}


def test_cuda_pickle_imports_on_the_cpu(tmp_path, monkeypatch, fisher_of_tiny):
    pkl, out = tmp_path / "fisher_dict.pkl", tmp_path / "sa_fisher.safetensors"
    view = torch.arange(12.0).view(3, 4)[1:, ::2]  # a strided view with a storage offset
    _dump_as_from_cuda({**fisher_of_tiny, "module.view": view}, pkl, monkeypatch)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # plain unpickling needs the GPU it names
            pickle.loads(pkl.read_bytes())
    loaded = load_tensor_pickle(pkl)
    assert torch.equal(loaded["module.view"], view) and all(v.device.type == "cpu" for v in loaded.values())
    _dump_as_from_cuda(fisher_of_tiny, pkl, monkeypatch)
    assert main(["convert", "--from", "lineage-sa-fisher", str(pkl), "--out", str(out)]) == 0
    written = load_file(str(out))
    assert written.keys() == {k.removeprefix("module.") for k in fisher_of_tiny}  # our names: no `module.`
    assert all(torch.equal(written[k.removeprefix("module.")], v) for k, v in fisher_of_tiny.items())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _StorageRunningCode:
    """A 'storage' whose embedded blob is a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return torch.storage._load_from_bytes, (pickle.dumps(_RunsCode(self.marker)),)


@pytest.mark.parametrize("payload", [_RunsCode, _StorageRunningCode])
def test_pickle_with_code_is_refused_in_one_line(tmp_path, capsys, payload):
    pkl, marker = tmp_path / "fisher_dict.pkl", tmp_path / "ran"
    pkl.write_bytes(pickle.dumps({"a": torch.ones(2), "b": payload(marker)}))
    assert main(["convert", "--from", "lineage-sa-fisher", str(pkl), "--out", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickle of tensors" in err and "--trust-pickle" not in err
    assert not marker.exists() and not (tmp_path / "f.safetensors").exists()


def test_non_fisher_contents_are_refused(tmp_path, monkeypatch):
    pkl = tmp_path / "fisher_dict.pkl"
    _dump_as_from_cuda({"module.w": torch.tensor([1.0, -2.0])}, pkl, monkeypatch)
    with pytest.raises(UserError, match="not a Fisher diagonal"):
        convert(ConvertConfig(path=str(pkl), from_format="lineage-sa-fisher", out=str(tmp_path / "f.safetensors")))


def _sa(model, out, **kw) -> ForgetConfig:
    return build_config(ForgetConfig, dict(model=str(model), dataset="digits", forget_class=3, out=str(out),
                                           method="sa", optim="shared", schedule="joint", iterations=2, batch_size=16,
                                           checkpoint_every=1, grid_per_class=1, sa_samples_per_class=2, steps=2,
                                           sample_batch_size=64, **kw))


def test_sa_forgets_with_the_imported_fisher(tiny_model, tmp_path, monkeypatch, fisher_of_tiny):
    pkl, fisher = tmp_path / "fisher_dict.pkl", tmp_path / "sa_fisher.safetensors"
    _dump_as_from_cuda(fisher_of_tiny, pkl, monkeypatch)
    assert main(["convert", "--from", "lineage-sa-fisher", str(pkl), "--out", str(fisher)]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the SA Fisher was computed despite --sa-fisher")

    used: dict[str, torch.Tensor] = {}
    prepare = SelectiveAmnesia.prepare

    def recording(self, *args):
        retain = prepare(self, *args)
        used.update(self.fisher)
        return retain

    monkeypatch.setattr("diffusion_unlearn.methods.sa.timestep_summed_fisher", refuse)
    monkeypatch.setattr(SelectiveAmnesia, "prepare", recording)
    forget(_sa(tiny_model, tmp_path / "run", sa_fisher=str(fisher)))
    assert used.keys() == load_file(str(fisher)).keys()
    assert all(torch.equal(used[k.removeprefix("module.")], v) for k, v in fisher_of_tiny.items())
    assert not (tmp_path / "run" / "sa_fisher.safetensors").exists()  # nothing computed beside the run


def test_sa_refuses_a_fisher_of_another_model_before_any_work(tiny_model, tmp_path, fisher_of_tiny):
    fisher = tmp_path / "sa_fisher.safetensors"
    save_fisher({k.removeprefix("module."): v for k, v in list(fisher_of_tiny.items())[1:]}, fisher, "test")
    with pytest.raises(UserError, match="does not match the model") as err:
        forget(_sa(tiny_model, tmp_path / "run", sa_fisher=str(fisher)))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "replay.safetensors").exists()  # refused before the replay is sampled
    with pytest.raises(UserError, match="convert --from lineage-sa-fisher"):
        forget(_sa(tiny_model, tmp_path / "run2", sa_fisher=str(tmp_path / "fisher_dict.pkl")))
