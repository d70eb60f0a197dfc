"""Files: atomic writes, safe loading of pickled checkpoints, JSON/JSONL helpers, user-facing errors."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from diffusion_unlearn.errors import UserError, WriteError  # noqa: F401 - re-exported: fileio.UserError


_NO_SPACE = "free some disk space or choose another folder"
_NOT_WRITABLE = "choose a folder you can write to"
_WRITE_ERRNOS = {  # errno of a failed write → the fix
    errno.ENOSPC: _NO_SPACE, errno.EDQUOT: _NO_SPACE, errno.EFBIG: _NO_SPACE,
    errno.EACCES: _NOT_WRITABLE, errno.EPERM: _NOT_WRITABLE, errno.EROFS: _NOT_WRITABLE,
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; choose a file path",
}
# torch.save reports a failed write (e.g. a full disk) as a RuntimeError of its zip writer, without errno.
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def write_failure(path: str | os.PathLike, error: BaseException) -> WriteError | None:
    """The one-line `WriteError` for an OS-level failure to write `path`; None for any other error."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        fix = _WRITE_ERRNOS[error.errno]
        return WriteError(f"cannot write {path}: {error.strerror or error}; {fix}")
    if isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITE_FAILURES):
        return WriteError(f"cannot write {path}: the write failed part-way (most likely no space left on the "
                          f"device); {_NO_SPACE}")
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OS-level failure to write `path` inside the block into one `WriteError` line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        mapped = write_failure(path, e)
        if mapped is None:
            raise
        raise mapped from e


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. An OS-level
    failure (read-only place, no space) becomes one `WriteError` line naming `path`; `path` is left as it was."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds (OS-level failures
    as `atomic_path`)."""
    path = Path(path)
    with writing(path):
        yield from _atomic_dir(path)


def _atomic_dir(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; an unreadable or invalid file is one `UserError` line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}); repair or remove the file") \
            from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (made contiguous, on the CPU) as a safetensors file at `path` atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- safe loading

# Harmless types that the lineage's and DiT's pickled checkpoints hold besides tensors.
SAFE_GLOBALS = [argparse.Namespace]


def load_pickled_checkpoint(path: str | os.PathLike, *, trust_pickle: bool | None = None) -> Any:
    """Load a `.pt`/`.pth` file on the CPU with `weights_only=True` (argparse.Namespace allowed).

    Files saved on GPUs load on CPU (`map_location="cpu"`). Arbitrary unpickling happens only with
    `trust_pickle=True`, because unpickling can run code that the file's author chose. `trust_pickle=None`
    means the calling command has no `--trust-pickle` option, so no error suggests it. A file that is no
    checkpoint at all is one `UserError` line either way.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass the path of an existing .pt/.pth file)")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one line
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        refused = isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)
        if not trust_pickle and refused and _starts_like_a_pickle(path):
            fix = ("if you trust who made this file, pass --trust-pickle to allow arbitrary unpickling"
                   if trust_pickle is False else "it holds more than tensors, which this command does not load")
            raise UserError(f"cannot load {path} safely ({_weights_only_refusal(e)}); {fix}") from e
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({detail}); pass a .pt/.pth file saved "
                        "with torch.save") from e


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether the file opens as torch.save's zip archive or with a pickle's PROTO opcode (not text or another
    format, where no unpickler could help)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _weights_only_refusal(error: Exception) -> str:
    """What torch's long weights-only message says it refused (e.g. `Unsupported global: GLOBAL builtins.print`)."""
    lines = str(error).split("WeightsUnpickler error:", 1)[-1].splitlines()
    said = next((line.strip() for line in lines if line.strip()), "refused by the weights-only unpickler")
    return said.split(" was not an allowed")[0][:200]


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """Drop a DataParallel/DDP `module.` prefix from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
