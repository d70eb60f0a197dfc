"""Restricted reading of a plain `pickle.dump` of a dict name → tensor, such as Selective Amnesia's
`fisher_dict.pkl` (reference §2.3: CUDA tensors, `module.` keys).

`pickle.dump` of a tensor (not `torch.save`) stores `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks[, metadata])`, the storage as `torch.storage._load_from_bytes(blob)`, where `blob`
is a legacy `torch.save` of the storage naming its device ("cuda:0"). Plain `pickle.load` would import whatever
the file names and restore CUDA storages on a GPU. Here only those rebuild functions (and `OrderedDict`, the
hooks' container) may be named: each storage blob is read by `torch.load(map_location="cpu", weights_only=True)`,
so no code from the file runs and no GPU is needed.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from diffusion_unlearn.fileio import UserError


def _storage_from_bytes(blob: bytes) -> torch.storage.TypedStorage:
    """A storage from the `torch.save` bytes `TypedStorage.__reduce__` embeds, on the CPU, weights-only."""
    if not isinstance(blob, bytes):
        raise pickle.UnpicklingError(f"a storage must be bytes, not {type(blob).__name__}")
    try:
        storage = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise pickle.UnpicklingError("a storage blob names more than tensor data (code)") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a storage blob holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool, hooks: Any,
                    *metadata: Any) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2` of a storage read by `_storage_from_bytes`, without backward hooks."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor must be built on a storage, not on {type(storage).__name__}")
    if hooks:
        raise pickle.UnpicklingError("a tensor carries backward hooks (code); refusing to restore them")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict(),
                                           *metadata)


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class TensorUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS`, to our own safe versions."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a tensor rebuild function") from None


def load_tensor_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The dict name → tensor (on the CPU) of a `pickle.dump` file, read by `TensorUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pickle file not found: {path} (pass the path of an existing .pkl file)")
    try:
        with open(path, "rb") as f:
            obj = TensorUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - malformed or malicious: one line, never run
        raise UserError(f"cannot read {path} as a pickle of tensors ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); only dicts of tensors are accepted") from e
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} does not hold a dict of parameter name → tensor")
    return obj
