"""Provenance: every file a later run reuses records the settings that made it, and is reused only when they match.

A `Provenance` is a small typed record (kind, settings, code format version) stored inside the artefact (a
`state.pt` key, safetensors metadata, a JSON key) or beside it. `settings_of` turns any config (or plain dict)
into the flat settings that can change a result: nested sections become dotted keys and the settings in
`NO_EFFECT` (where output goes, logging and checkpoint cadence, device, progress) are left out, so they may differ.
`check_reuse` raises one `UserError` line naming each differing setting with both values and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from diffusion_unlearn.fileio import UserError

# The layout and meaning of resumable state written by this code (forget's state.pt, pretrain's
# training_state.pt). Bump it whenever an older state would resume differently; resume refuses other versions.
# 2: per-sample draws keyed by (seed, stream, batch, global sample index), streams saved as batch counters, no RNG.
# 3: optimizer states in parameter groups of at most optim.GROUP_ELEMENTS elements.
# 4: GROUP_ELEMENTS 16 M → 1 M (more parameter groups).
FORMAT_VERSION = 4

# Settings that cannot change a result: where files go, how often they are written or logged, on which device.
NO_EFFECT = frozenset({"device", "out", "cache_dir", "log_every", "checkpoint_every", "progress", "restart", "jobs"})

RESTART_HINT = "choose a new --out, or pass --restart to discard the old state"
MISSING = "<unset>"


def _plain(value: Any) -> Any:
    """JSON-plain form (tuples → lists, paths → str), so a record compares equal after a round trip."""
    return json.loads(json.dumps(value, default=str))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → one level with dotted keys (`sampler.steps`)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


def settings_of(config: Any, ignore: frozenset[str] = NO_EFFECT) -> dict[str, Any]:
    """The flat settings of a config (anything `config_to_dict` takes) or dict that can change a result: every
    leaf except those whose own name is in `ignore`."""
    if not isinstance(config, Mapping):
        from diffusion_unlearn.config import config_to_dict

        config = config_to_dict(config)
    return {k: v for k, v in flatten(config).items() if k.rsplit(".", 1)[-1] not in ignore}


@dataclass(frozen=True)
class Provenance:
    """What made an artefact: its `kind` (e.g. "forget-state", "mask"), the `settings` that determine its content,
    and the code's `format_version`."""

    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "settings": _plain(self.settings), "format_version": self.format_version}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | None) -> Provenance | None:
        """The record stored by `to_dict`, or None where there is none (an artefact made by an older version)."""
        if not isinstance(record, Mapping) or "kind" not in record:
            return None
        return cls(str(record["kind"]), dict(record.get("settings") or {}), int(record.get("format_version", 0)))

    @classmethod
    def from_json(cls, text: str | None) -> Provenance | None:
        if not text:
            return None
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, TypeError):
            return None


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`name OLD (now NEW)` for each setting whose value differs (missing on one side counts as differing)."""
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k, MISSING)!r} (now {new.get(k, MISSING)!r})" for k in keys
            if old.get(k, MISSING) != new.get(k, MISSING)]


def check_reuse(on_disk: Provenance | None, expected: Provenance, path: Any, fix_hint: str = RESTART_HINT, *,
                check_version: bool = False) -> None:
    """Raise one `UserError` line unless the artefact at `path` was made as `expected` says: same kind, same
    settings (each difference named with both values) and, with `check_version` (resume), the same format."""
    if on_disk is None:
        raise UserError(f"{path} records no settings (made by an older version), so it cannot be reused safely; "
                        f"{fix_hint}")
    if on_disk.kind != expected.kind:
        raise UserError(f"{path} is a {on_disk.kind}, not a {expected.kind}; {fix_hint}")
    if check_version and on_disk.format_version != expected.format_version:
        raise UserError(f"{path} was written in format version {on_disk.format_version}, this code resumes only "
                        f"version {expected.format_version}; {fix_hint}")
    changed = differences(on_disk.settings, _plain(expected.settings))
    if changed:
        raise UserError(f"{path} was made with other settings: {', '.join(changed)}; {fix_hint}")


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and values): a model's identity by its weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_record(path: Any, fix_hint: str = RESTART_HINT) -> Provenance | None:
    """The record under `"provenance"` in a `torch.save`d state dict, read lazily (its tensors stay on disk)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"cannot read {path} ({type(e).__name__}); {fix_hint}") from e
    return Provenance.from_dict(state.get("provenance") if isinstance(state, dict) else None)


def model_files_identity(folder: Any) -> str:
    """A model folder's identity without loading it: SHA-256 over its weight files' names, sizes and modification
    times (any rewrite of the weights changes it)."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def short_key(settings: Mapping[str, Any]) -> str:
    """An 8-hex-digit key of settings, for file names that change whenever the settings do."""
    return hashlib.sha256(json.dumps(_plain(dict(settings)), sort_keys=True).encode()).hexdigest()[:8]
