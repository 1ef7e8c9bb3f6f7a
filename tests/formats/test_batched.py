"""Listing as the header is read, and reading many tensors with few system calls, without changing a byte."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.serialization import config as serialization_config

import ownership.formats.mapped as mapping
from ownership.errors import CheckpointError
from ownership.formats import SafetensorsFile, TorchFile, open_checkpoint
from ownership.formats.single import _STEP
from tests.formats.builders import save_safetensors, save_sharded, save_torch

TENSORS = {
    f"layers.{i}.w": torch.arange(i * 100, i * 100 + 24, dtype=torch.float32).reshape(4, 6) for i in range(8)
}
ROWS = (((1, 3, 1),), None)


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Calls of os.<name> from here on, one item per call."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(os, name)

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(os, name, counted)
    return calls


def test_tensors_back_to_back_are_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_safetensors(tmp_path / "w.safetensors", tensors=TENSORS)
    with SafetensorsFile(path) as checkpoint:
        calls = _counting(monkeypatch, "preadv")
        out = checkpoint.read_many([(key, None) for key in TENSORS])
        assert len(calls) == 1
        assert all(torch.equal(got, TENSORS[key]) for got, key in zip(out, TENSORS, strict=True))
        assert checkpoint.stats.bytes_read == sum(t.numel() * 4 for t in TENSORS.values())
        # Rows of each tensor are not back to back: a read each, exactly the rows.
        calls.clear()
        rows = checkpoint.read_many([(key, ROWS) for key in TENSORS])
        assert len(calls) == len(TENSORS)
        assert all(torch.equal(got, TENSORS[key][1:3]) for got, key in zip(rows, TENSORS, strict=True))


def test_short_reads_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_safetensors(tmp_path / "w.safetensors", tensors=TENSORS)
    original = os.preadv

    def at_most_40_bytes(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = memoryview(buffers[0])[:40]
        return original(fd, [first], offset)

    with SafetensorsFile(path) as checkpoint:
        monkeypatch.setattr(os, "preadv", at_most_40_bytes)
        out = checkpoint.read_many([(key, None) for key in TENSORS])
    assert all(torch.equal(got, TENSORS[key]) for got, key in zip(out, TENSORS, strict=True))


def test_bin_records_are_read_with_their_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_torch(tmp_path / "w.bin", tensors=TENSORS)
    with TorchFile(path) as checkpoint:
        peeks, reads = _counting(monkeypatch, "pread"), _counting(monkeypatch, "preadv")
        out = checkpoint.read_many([(key, None) for key in TENSORS])
        # torch.save's headers are as long as predicted: none is read on its own. Each comes with its data and
        # the data descriptor before it, so records that follow one another are one read; only data counts.
        assert (len(peeks), len(reads)) == (0, 1)
        assert checkpoint.stats.bytes_read == len(TENSORS) * 24 * 4
        # Headers once confirmed are not read again; rows cut out of each record are a read each.
        rows = checkpoint.read_many([(key, ROWS) for key in TENSORS])
        assert (len(peeks), len(reads)) == (0, 1 + len(TENSORS))
        assert checkpoint.stats.bytes_read == len(TENSORS) * 24 * 4 + len(TENSORS) * 2 * 6 * 4
    with TorchFile(path) as checkpoint:
        # Asked in any order, records are read in file order.
        reads.clear()
        backwards = checkpoint.read_many([(key, None) for key in reversed(TENSORS)])
        assert (len(peeks), len(reads)) == (0, 1)
    assert all(torch.equal(got, TENSORS[key]) for got, key in zip(out, TENSORS, strict=True))
    assert all(torch.equal(got, TENSORS[key]) for got, key in zip(backwards, reversed(TENSORS), strict=True))
    assert all(torch.equal(got, TENSORS[key][1:3]) for got, key in zip(rows, TENSORS, strict=True))


def test_bin_with_another_alignment_is_read_right(tmp_path: Path) -> None:
    # Set and restored by hand: monkeypatch deletes what it restores on torch's config object.
    default = serialization_config.save.storage_alignment
    serialization_config.save.storage_alignment = 4096
    try:
        path = save_torch(tmp_path / "w.bin", tensors=TENSORS)
    finally:
        serialization_config.save.storage_alignment = default
    with TorchFile(path) as checkpoint:
        first = checkpoint.read_many([(key, None) for key in list(TENSORS)[:4]])
        rest = checkpoint.read_many([(key, ROWS) for key in list(TENSORS)[4:]])
    assert all(torch.equal(got, TENSORS[key]) for got, key in zip(first, TENSORS, strict=False))
    assert all(torch.equal(got, TENSORS[key][1:3]) for got, key in zip(rest, list(TENSORS)[4:], strict=True))


def test_sharded_read_many_keeps_the_order(tmp_path: Path) -> None:
    keys = list(TENSORS)
    index = save_sharded(
        tmp_path,
        shards=[{k: TENSORS[k] for k in keys[:4]}, {k: TENSORS[k] for k in keys[4:]}],
        suffix="safetensors",
    )
    order = [keys[5], keys[0], keys[6], keys[1], keys[2]]
    with open_checkpoint(index) as checkpoint:
        out = checkpoint.read_many([(key, None) for key in order])
    assert all(torch.equal(got, TENSORS[key]) for got, key in zip(out, order, strict=True))


def _header_file(path: Path, *, count: int, bad: int) -> Path:
    """A safetensors file of `count` one-float tensors whose entry number `bad` has a wrong length."""
    header = {
        f"t{i:05d}": {"dtype": "F32", "shape": [2 if i == bad else 1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(count)
    }
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(4 * count))
    return path


def test_entries_come_before_the_listing_ends(tmp_path: Path) -> None:
    path = _header_file(tmp_path / "w.safetensors", count=3 * _STEP, bad=2 * _STEP + 5)
    message = (
        f"{path}: key 't{2 * _STEP + 5:05d}': corrupt or truncated safetensors file: found 4 bytes for shape [2] of "
        "F32, expected 8 bytes. Fix: re-download or re-save the file"
    )
    with SafetensorsFile(path) as checkpoint:
        listed = []
        with pytest.raises(CheckpointError) as info:
            for entry in checkpoint.iter_entries():
                listed.append(entry.key)
        assert str(info.value) == message
        assert listed == [f"t{i:05d}" for i in range(2 * _STEP)]
        # The listing stays failed: never a partial list that looks whole.
        with pytest.raises(CheckpointError) as again:
            checkpoint.entries()
        assert str(again.value) == message


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.parametrize("mapped", [False, True])
def test_prepared_reads_make_no_tensors_when_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, mapped: bool
) -> None:
    # A reader thread that calls torch gives the interpreter lock up and waits for it back (up to 5 ms while
    # another thread runs Python): for whole tensors and rows, `run()` must only read.
    monkeypatch.setattr(mapping, "MAP_MIN_BYTES", 1 if mapped else 2**62)
    save = save_safetensors if suffix == "safetensors" else save_torch
    path = save(tmp_path / f"w.{suffix}", tensors=TENSORS)
    with open_checkpoint(path) as checkpoint:
        pending = checkpoint.prepare_many([(key, None if i % 2 else ROWS) for i, key in enumerate(TENSORS)])

        def refused(*args: Any, **kwargs: Any) -> torch.Tensor:
            raise AssertionError("a tensor made in run()")

        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", refused)
            patch.setattr(torch, "frombuffer", refused)
            pending.run()
        out = pending.result()
    assert all((not t.untyped_storage().resizable()) == mapped for t in out)
    for i, (got, key) in enumerate(zip(out, TENSORS, strict=True)):
        assert torch.equal(got, TENSORS[key] if i % 2 else TENSORS[key][1:3])


def test_a_back_end_with_read_alone_can_be_prepared(tmp_path: Path) -> None:
    from ownership.formats.base import Checkpoint, Entry

    class OneTensor(Checkpoint):
        def entries(self) -> list[Entry]:
            return [Entry("w", "F32", (4, 6), "none")]

        def read(self, key: str, selection: Any = None) -> torch.Tensor:
            return TENSORS["layers.0.w"][1:3] if selection else TENSORS["layers.0.w"]

    pending = OneTensor(tmp_path).prepare_many([("w", None), ("w", ROWS)])
    pending.run()
    whole, rows = pending.result()
    assert torch.equal(whole, TENSORS["layers.0.w"]) and torch.equal(rows, TENSORS["layers.0.w"][1:3])
