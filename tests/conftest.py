"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Golden values computed by the reference code, kept in the repository (see tests/golden/README.md).
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of golden reference values (`NAME.json` + `NAME.npz`), part of the repository: never skipped."""
    return GOLDEN_DIR


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: on a small shared CPU, spinning threads make small steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny lineage U-Net model folder (10 digit classes); read-only for tests."""
    from diffusion_unlearn.modelfolder import ModelMeta, save_model_folder
    from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model_folder(path, ClassConditionalUNet.from_preset("tiny"),
                      ModelMeta(class_names=[str(i) for i in range(10)], dataset="digits"))
    return path
