"""The global batch: per-sample random draws keyed by what they are for, and sums over the whole batch, so that a
training run's numbers do not depend on how many processes (DDP) make it.

A `BatchStream` (data.py) yields batch n of a stream as this process's rows [lo, hi) of a GLOBAL batch of `size`
samples, and its `BatchKey`. Inside `with keyed(key):` every per-sample draw of the training step (timesteps, noise,
CFG label drop, a VAE posterior sample, dropout masks, a method's random labels or surrogate images) is made for the
whole global batch from a CPU generator seeded by (seed, stream, n, purpose, k-th draw of that purpose in this
batch), and this process keeps its rows. So 1 and N processes draw the same numbers for the same sample, and a
resumed run needs only the stream's batch counter (no RNG state). Outside a keyed batch (mask computation, Fisher,
sampling) the helpers draw from the global RNG exactly as before.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class BatchKey:
    """Batch `batch` of stream `stream` in a run seeded `seed`: `size` samples, of which this process holds rows
    [lo, hi); `world` processes share it in equal slices."""

    seed: int
    stream: str
    batch: int
    size: int
    lo: int
    hi: int
    world: int = 1
    draws_made: dict[str, int] = field(default_factory=dict, repr=False)  # purpose → draws so far in this batch

    def generator(self, purpose: str) -> torch.Generator:
        """A fresh CPU generator for the next draw of `purpose` in this batch."""
        k = self.draws_made.get(purpose, 0)
        self.draws_made[purpose] = k + 1
        return keyed_generator(self.seed, self.stream, self.batch, purpose, k)


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded by a hash of `key` (ints and strings): the same key, the same numbers, anywhere."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


_ACTIVE: ContextVar[BatchKey | None] = ContextVar("global_batch", default=None)


@contextmanager
def keyed(key: BatchKey) -> Iterator[BatchKey]:
    """Make the per-sample draws inside the block keyed draws of `key`'s global batch."""
    token = _ACTIVE.set(key)
    try:
        yield key
    finally:
        _ACTIVE.reset(token)


def active() -> BatchKey | None:
    """The keyed batch being computed, or None."""
    return _ACTIVE.get()


def draw(purpose: str, rows: int, make: Callable[[torch.Generator, int], torch.Tensor]) -> torch.Tensor | None:
    """`make(generator, n)` draws n samples' values (n, ...); this returns this process's `rows` of the draw for the
    global batch, or None outside a keyed batch. `rows` may be m copies of the local rows stacked (a guided pass
    doubles its batch): the draw is then made for m global batches and each copy keeps its slice."""
    key = active()
    if key is None:
        return None
    local = key.hi - key.lo
    if rows % local:
        raise ValueError(f"a keyed draw of {rows} rows inside a batch of which this process holds {local}")
    copies = rows // local
    values = make(key.generator(purpose), copies * key.size)  # (m·size, ...)
    values = values.view(copies, key.size, *values.shape[1:])[:, key.lo:key.hi]  # (m, local, ...)
    return values.reshape(rows, *values.shape[2:])


def randn_like(x: torch.Tensor, purpose: str) -> torch.Tensor:
    """Standard normal values shaped as x (B, ...): keyed per sample, else from the global RNG."""
    out = draw(purpose, x.shape[0], lambda g, n: torch.randn((n, *x.shape[1:]), generator=g))
    return torch.randn_like(x) if out is None else out.to(x.device, x.dtype)


def rand_like(x: torch.Tensor, purpose: str) -> torch.Tensor:
    """Uniform [0, 1) values shaped as x (B, ...): keyed per sample, else from the global RNG."""
    out = draw(purpose, x.shape[0], lambda g, n: torch.rand((n, *x.shape[1:]), generator=g))
    return torch.rand_like(x) if out is None else out.to(x.device, x.dtype)


def randint(low: int, high: int, rows: int, purpose: str, device: torch.device | str) -> torch.Tensor:
    """Integers in [low, high) (rows,): keyed per sample, else from the global RNG."""
    out = draw(purpose, rows, lambda g, n: torch.randint(low, high, (n,), generator=g))
    return torch.randint(low, high, (rows,), device=device) if out is None else out.to(device)


def gather(values: torch.Tensor) -> torch.Tensor:
    """The global batch's values (size, ...) from every process's rows (B_local, ...) (all_gather), in sample
    order; the values themselves outside a keyed batch or on one process."""
    key = active()
    if key is None or key.world == 1:
        return values
    import torch.distributed as dist

    parts = [torch.empty_like(values) for _ in range(key.world)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def sum_share(terms: torch.Tensor) -> torch.Tensor:
    """Σ over the global batch of per-sample terms, as this process's share: DDP averages the processes'
    gradients, so each contributes world · Σ_local (equal slices). Σ_local outside a keyed batch."""
    key = active()
    return terms.sum() * (1 if key is None else key.world)


class KeyedDropout(torch.nn.Dropout):
    """`nn.Dropout` whose mask is a keyed per-sample draw inside a keyed batch (global RNG outside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        # the mask as torch's dropout makes it (1/(1-p) where kept, else 0), in place on the uniform draw: one pass
        # and one multiply each way fewer than comparing into bool, converting and dividing
        scale = draw("dropout", x.shape[0],
                     lambda g, n: torch.rand((n, *x.shape[1:]), generator=g).ge_(self.p).div_(1 - self.p))
        if scale is None:
            return super().forward(x)
        return x * scale.to(x.device, x.dtype)  # (B, ...)


def key_dropout(module: torch.nn.Module) -> None:
    """Turn every plain `nn.Dropout` in `module` into a `KeyedDropout` (no parameters change; outside a keyed batch
    it is the same dropout). With gradient checkpointing a recomputed forward would draw new masks: the loop refuses
    that combination."""
    for m in module.modules():
        if type(m) is torch.nn.Dropout:
            m.__class__ = KeyedDropout


def has_dropout(module: torch.nn.Module) -> bool:
    """Whether `module` drops activations at random in training."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())
