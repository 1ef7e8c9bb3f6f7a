"""Fuzzing: real-tool checkpoints, indexes, configs and rule files, mutated at random, give correct results or an
`OwnershipError`, never another exception, and a reader never pulls bytes from outside the file's tensor data.

The mutations (a byte changed, bytes inserted, the file cut short, a run overwritten) hit headers, offsets,
pickles and zip directories as often as tensor bytes. Bounded in examples and time: under a minute in all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ownership import OwnershipError, load_ruleset
from ownership.formats import open_checkpoint
from ownership.ruleset import Ruleset
from ownership.spec.builtin import builtin_path
from tests.conftest import FIXTURES

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    # monkeypatch is used through a context of its own per example.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def mutations(draw: st.DrawFn, *, size: int) -> Callable[[bytes], bytes]:
    """One way to spoil a file of `size` bytes, biased towards its first KiB (headers, pickles)."""
    near_start = st.integers(0, min(size, 1024) - 1)
    anywhere = st.integers(0, size - 1)
    at = draw(st.one_of(near_start, anywhere))
    kind = draw(st.sampled_from(["flip", "insert", "cut", "overwrite"]))
    data = draw(st.binary(min_size=1, max_size=16))

    def spoil(raw: bytes) -> bytes:
        if kind == "flip":
            return raw[:at] + bytes([raw[at] ^ data[0] or 1]) + raw[at + 1 :]
        if kind == "insert":
            return raw[:at] + data + raw[at:]
        if kind == "cut":
            return raw[:at]
        return raw[:at] + data + raw[at + len(data) :]

    return spoil


@contextmanager
def _copy(folder: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / folder.name
        shutil.copytree(folder, target)
        yield target


@contextmanager
def _reads_recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """Every `preadv` as (fd, offset, bytes asked)."""
    reads: list[tuple[int, int, int]] = []
    real = os.preadv

    def recorded(fd: int, buffers: Any, offset: int, *args: Any) -> int:
        reads.append((fd, offset, sum(len(memoryview(b)) for b in buffers)))
        return real(fd, buffers, offset, *args)

    with monkeypatch.context() as patch:
        patch.setattr(os, "preadv", recorded)
        yield reads


def _load_everything(path: Path) -> None:
    """List a checkpoint and read every tensor whole and by its first rows; the shapes must be the headers'."""
    with open_checkpoint(path, mmap=False) as checkpoint:
        entries = checkpoint.entries()
        tensors = checkpoint.read_many([(entry.key, None) for entry in entries])
        for entry, tensor in zip(entries, tensors, strict=True):
            assert tuple(tensor.shape) == entry.shape, entry.key
        rows = [
            (e.key, (((0, 1, 1),), *([None] * (len(e.shape) - 1)))) for e in entries if e.shape and e.shape[0]
        ]
        for (key, _), tensor in zip(rows, checkpoint.read_many(rows), strict=True):
            assert tensor.shape[0] == 1, key


def _fuzz_file(
    folder: Path,
    name: str,
    spoil: Callable[[bytes], bytes],
    monkeypatch: pytest.MonkeyPatch,
    *,
    data_start: Callable[[bytes], int] = lambda raw: 0,
) -> None:
    """Spoil the one weights file of a copy of `folder`, load everything, and check every read lies between
    `data_start(spoiled bytes)` and the file's end."""
    with _copy(folder) as copy:
        target = copy / name
        spoiled = spoil(target.read_bytes())
        target.write_bytes(spoiled)
        with _reads_recorded(monkeypatch) as reads, contextlib.suppress(OwnershipError):
            _load_everything(copy)
        low = data_start(spoiled)
        outside = [
            (offset, length)
            for _, offset, length in reads
            if not low <= offset <= offset + length <= len(spoiled)
        ]
        assert outside == []


def _safetensors_data(raw: bytes) -> int:
    """Where a safetensors file's tensor data starts: after the 8-byte length and the header it gives."""
    return 8 + int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0


SAFETENSORS = FIXTURES / "qwen3_moe" / "lora_per_expert"
TORCH = FIXTURES / "qwen3_moe" / "lora_per_expert_bin"
SHARDED = FIXTURES / "qwen3_moe" / "base"


@SETTINGS
@given(spoil=mutations(size=(SAFETENSORS / "adapter_model.safetensors").stat().st_size))
def test_spoiled_safetensors(spoil: Callable[[bytes], bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    _fuzz_file(SAFETENSORS, "adapter_model.safetensors", spoil, monkeypatch, data_start=_safetensors_data)


@SETTINGS
@given(spoil=mutations(size=(TORCH / "adapter_model.bin").stat().st_size))
def test_spoiled_torch_zip(spoil: Callable[[bytes], bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    _fuzz_file(TORCH, "adapter_model.bin", spoil, monkeypatch)


@SETTINGS
@given(spoil=mutations(size=(SHARDED / "model.safetensors.index.json").stat().st_size))
def test_spoiled_index(spoil: Callable[[bytes], bytes]) -> None:
    with _copy(SHARDED) as copy:
        index = copy / "model.safetensors.index.json"
        index.write_bytes(spoil(index.read_bytes()))
        with contextlib.suppress(OwnershipError):
            _load_everything(copy)


@SETTINGS
@given(spoil=mutations(size=(SHARDED / "config.json").stat().st_size))
def test_spoiled_config(spoil: Callable[[bytes], bytes]) -> None:
    ruleset = load_ruleset("qwen3_moe")
    with _copy(SHARDED) as copy:
        path = copy / "config.json"
        path.write_bytes(spoil(path.read_bytes()))
        with contextlib.suppress(OwnershipError):
            ruleset.plan(copy, mesh="ep=2,tp=2", rank=1)


RULES = builtin_path("transformers-moe").read_bytes()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(spoil=mutations(size=len(RULES)))
def test_spoiled_rule_file(spoil: Callable[[bytes], bytes]) -> None:
    text = spoil(RULES).decode("utf-8", errors="replace")
    with contextlib.suppress(OwnershipError):
        ruleset = Ruleset.from_text(text, source="spoiled.toml")
        ruleset.plan(
            ["model.layers.0.mlp.experts.1.up_proj.weight", "model.embed_tokens.weight"],
            mesh="pp=2,ep=2,tp=2",
            rank=3,
            config={
                "num_experts": 4,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "hidden_size": 32,
                "num_key_value_heads": 2,
                "vocab_size": 64,
                "intermediate_size": 16,
                "moe_intermediate_size": 8,
            },
        )
