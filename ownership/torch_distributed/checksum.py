"""Checksums of tensors where they are: 64-bit, the same for the same bytes on any device.

The bytes, as 64-bit words (the last one zero-padded), are mixed each with its position (splitmix64's
multipliers and an xor-shift, a bijection of the word for each position) and summed modulo 2**64 on the tensor's
device; BLAKE2b then mixes the sum with the dtype and byte count. Integer sums do not depend on the order of the
additions, so a GPU and a CPU agree bit for bit, and a GPU load is hashed without copying it back.

Example:
    >>> import torch
    >>> checksum(torch.zeros(3)) == checksum(torch.zeros(3)), checksum(torch.zeros(3)) == checksum(torch.ones(3))
    (True, False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["checksum", "checksums"]

# splitmix64's odd multipliers, as the int64 values torch multiplies with (wrapping).
_M1 = 0x9E3779B97F4A7C15 - 2**64
_M2 = 0xBF58476D1CE4E5B9 - 2**64
_M3 = 0x94D049BB133111EB - 2**64
# Words hashed per step of a large tensor: bounds the temporaries (three of this size) on its device.
_CHUNK_WORDS = 2**20
# Tensors up to this size are hashed together, in batches of up to _CHUNK_WORDS words.
_SMALL_BYTES = 2**16


def checksum(tensor: torch.Tensor) -> int:
    """A 64-bit checksum of a tensor's dtype and bytes, computed on the tensor's device; see `checksums`."""
    return checksums([tensor])[0]


def checksums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """64-bit checksums of tensors' dtypes and bytes, the same for the same bytes on any device.

    The bytes, as 64-bit words (the last one zero-padded), are mixed each with its position (splitmix64's
    multipliers and an xor-shift, a bijection of the word for each position) and summed modulo 2**64, on the tensor's
    device in steps of 8 MiB; BLAKE2b then mixes the sum with the dtype and byte count. Integer sums do not
    depend on the order of the additions, so a GPU and a CPU agree bit for bit, and a GPU load is hashed without
    copying it back. A change of one word always changes the sum. Small tensors are hashed in batches; each
    device's sums come back in one transfer.

    Example:
        >>> a, b = torch.arange(5, dtype=torch.int16), torch.arange(5, dtype=torch.int16).flip(0)
        >>> len(set(checksums([a, b, a.to(torch.int32)]))), checksums([a]) == [checksum(a)]
        (3, True)
    """
    sums: list[torch.Tensor | None] = [None] * len(tensors)
    data: list[torch.Tensor] = []
    small: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        raw = _bytes(tensor)
        data.append(raw)
        if raw.numel() <= _SMALL_BYTES:
            small.setdefault(raw.device, []).append(i)
        else:
            sums[i] = _large_sum(raw)
    for device, indices in small.items():
        batch: list[int] = []
        words = 0
        for i in indices:
            size = -(-data[i].numel() // 8)
            if batch and words + size > _CHUNK_WORDS:
                _small_sums(data, batch, sums, device)
                batch, words = [], 0
            batch.append(i)
            words += size
        if batch:
            _small_sums(data, batch, sums, device)
    values: dict[int, int] = {}
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, value in enumerate(sums):
        assert value is not None
        by_device.setdefault(value.device, []).append((i, value))
    for items in by_device.values():
        stacked = torch.stack([value for _, value in items]).tolist()
        values.update(zip((i for i, _ in items), (int(v) for v in stacked), strict=True))
    out = []
    for i, tensor in enumerate(tensors):
        text = f"{tensor.dtype}|{data[i].numel()}|{values[i] % 2**64}"
        out.append(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))
    return out


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its device, 8-byte aligned (copied only when not)."""
    data = tensor.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    raw = data.reshape(-1).view(torch.uint8)
    if raw.storage_offset() % 8:
        raw = raw.clone()
    return raw


def _mix(words: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each word mixed with its position; `positions` is consumed. The right shift is masked to be logical."""
    x = words * _M1
    x.bitwise_xor_(positions.mul_(_M2))
    x.bitwise_xor_((x >> 29).bitwise_and_(2**35 - 1))
    return x.mul_(_M3)


def _large_sum(raw: torch.Tensor) -> torch.Tensor:
    num_words, tail = divmod(raw.numel(), 8)
    words = raw[: num_words * 8].view(torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=raw.device)
    for start in range(0, num_words, _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        positions = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=raw.device)
        total += _mix(chunk, positions).sum()
    if tail:
        padded = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        padded[:tail] = raw[num_words * 8 :]
        position = torch.full((1,), num_words, dtype=torch.int64, device=raw.device)
        total += _mix(padded.view(torch.int64), position).sum()
    return total


def _small_sums(
    data: Sequence[torch.Tensor], batch: Sequence[int], sums: list[torch.Tensor | None], device: torch.device
) -> None:
    """The sums of several small tensors at once: their padded bytes joined, positions restarting per tensor."""
    pieces: list[torch.Tensor] = []
    counts: list[int] = []
    for i in batch:
        raw = data[i]
        pieces.append(raw)
        pad = -raw.numel() % 8
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.uint8, device=device))
        counts.append((raw.numel() + pad) // 8)
    total = sum(counts)
    words = torch.cat(pieces).view(torch.int64) if total else torch.zeros(0, dtype=torch.int64, device=device)
    count_tensor = torch.tensor(counts, dtype=torch.int64, device=device)
    starts = torch.cumsum(count_tensor, 0) - count_tensor
    owner = torch.repeat_interleave(torch.arange(len(batch), device=device), count_tensor, output_size=total)
    positions = torch.arange(total, dtype=torch.int64, device=device) - starts[owner]
    batch_sums = torch.zeros(len(batch), dtype=torch.int64, device=device)
    batch_sums.index_add_(0, owner, _mix(words, positions))
    for j, i in enumerate(batch):
        sums[i] = batch_sums[j]
