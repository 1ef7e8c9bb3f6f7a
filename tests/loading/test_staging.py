"""Staged loading to a CUDA device: the ring of host buffers, file runs, and the loader's staged path.

On a machine without CUDA the ring and the loader's staged path run against a fake device whose copies happen
late (only when their fence is waited on), so that a buffer refilled before its copy finished shows as wrong
data. The tests marked `cuda` run only where torch sees a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ownership.loading.loader as loader_module
from ownership import CheckpointError, load_ruleset
from ownership.formats import open_checkpoint
from ownership.loading.loader import LoadStats, iter_load, load
from ownership.loading.plan import build_plan
from ownership.loading.staging import FileRuns, StagingRing, host_fill
from ownership.torch_distributed import checksum, checksums
from tests.conftest import FIXTURES

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _LateFence:
    def __init__(self, target: torch.Tensor, source: torch.Tensor, log: list[str]) -> None:
        self.target, self.source, self.log, self.done = target, source, log, False

    def wait(self) -> None:
        if not self.done:
            self.target.copy_(self.source)
            self.done = True
            self.log.append("copied")


class LateTransfer:
    """A fake device: a copy happens when its fence is waited on, reading the buffer as it is then."""

    def __init__(self, device: Any = None) -> None:
        self.device = torch.device("cpu")
        self.log: list[str] = []
        self.num_buffers = 0

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.num_buffers += 1
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> _LateFence:
        self.log.append("started")
        return _LateFence(target, source, self.log)

    def publish(self) -> None:
        self.log.append("published")


@pytest.mark.parametrize("num_readers", [1, 2, 3])
def test_the_ring_refills_a_buffer_only_after_its_copy_and_cuts_tensors_into_chunks(num_readers: int) -> None:
    transfer = LateTransfer()
    ring = StagingRing(transfer, num_buffers=4, buffer_bytes=64, num_readers=num_readers)
    generator = torch.Generator().manual_seed(0)
    sources = [
        torch.randn(37, generator=generator),  # 148 bytes: 3 chunks of 16 floats
        torch.randint(0, 100, (5, 3), generator=generator, dtype=torch.int64),  # 120 bytes: 2 chunks
        torch.randn((), generator=generator, dtype=torch.float64),
        torch.randn(0, 4, generator=generator),
        torch.randn(200, generator=generator).to(torch.bfloat16),  # 400 bytes: 7 chunks of 32
    ]
    targets = [torch.full(s.shape, -1, dtype=s.dtype) for s in sources]
    started: list[Any] = []
    for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
        started += ring.upload(target, fill=host_fill(source), source_dtype=source.dtype, tag=i)
        assert started == list(range(len(started)))
    started += ring.finish()
    ring.close()
    assert started == list(range(len(sources)))
    for source, target in zip(sources, targets, strict=True):
        assert torch.equal(source, target)
    assert ring.num_copies == 3 + 2 + 1 + 0 + 7
    assert transfer.num_buffers == 1  # one allocation, cut into the buffers
    # Every copy started was finished; the first buffer was refilled (its copy waited for) once the fills in
    # flight and the copies started used every buffer.
    assert transfer.log.count("copied") == ring.num_copies
    assert transfer.log.index("copied") == 4 - (num_readers - 1)
    assert ring.num_readers == num_readers


def test_the_ring_casts_on_the_device_side_per_chunk() -> None:
    ring = StagingRing(LateTransfer(), num_buffers=3, buffer_bytes=32, num_readers=2)
    source = torch.linspace(-3, 3, 29)
    target = torch.empty(29, dtype=torch.bfloat16)
    assert ring.upload(target, fill=host_fill(source), source_dtype=torch.float32, tag="t") == []
    assert ring.finish() == ["t"]
    ring.close()
    assert torch.equal(target, source.to(torch.bfloat16))


def test_a_failed_read_leaves_no_copy_running() -> None:
    transfer = LateTransfer()
    ring = StagingRing(transfer, num_buffers=4, buffer_bytes=16, num_readers=2)

    def broken(buffer: torch.Tensor, start: int) -> None:
        if start >= 32:
            raise CheckpointError("file ends inside a tensor")
        buffer.fill_(7)

    target = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="file ends inside a tensor"):
        ring.upload(target, fill=broken, source_dtype=torch.uint8)
        ring.finish()
    ring.close()
    assert transfer.log.count("started") == transfer.log.count("copied") == 2
    assert target[:32].tolist() == [7] * 32


def test_a_ring_needs_buffers_of_whole_elements() -> None:
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        StagingRing(LateTransfer(), buffer_bytes=24)


def test_file_runs_fill_across_run_boundaries(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    path = tmp_path / "raw"
    path.write_bytes(data)
    runs = [(10, 7), (100, 1), (101, 30), (500, 64)]
    expected = b"".join(data[o : o + n] for o, n in runs)
    read: list[int] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        source = FileRuns(fd, runs=runs, display="raw", on_read=read.append)
        assert source.nbytes == len(expected)
        for start, size in [(0, len(expected)), (5, 9), (7, 1), (8, 40), (38, 64)]:
            buffer = torch.zeros(size, dtype=torch.uint8)
            source(buffer, start)
            assert bytes(buffer.tolist()) == expected[start : start + size], (start, size)
        assert read == [len(expected), 9, 1, 40, 64]
        truncated = FileRuns(fd, runs=[(1000, 100)], display="raw", on_read=read.append)
        with pytest.raises(
            CheckpointError, match=r"^raw: file ends inside a tensor: found end of file after 24"
        ):
            truncated(torch.zeros(100, dtype=torch.uint8), 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["lora_per_expert", "lora_fused", "lora_fused_bin", "base", "base_bin"])
def test_staged_loads_equal_host_loads_and_read_the_same_bytes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged path, on a fake device: direct file runs for row selections (`Checkpoint.byte_runs`, of
    safetensors and .bin records alike), the back-end for the rest (strided columns of fused lora_B); single
    files, adapter folders and sharded models."""
    monkeypatch.setattr(loader_module, "CudaTransfer", LateTransfer)
    direct: list[int] = []

    class CountedRuns(FileRuns):
        def __call__(self, buffer: torch.Tensor, start: int) -> None:
            direct.append(buffer.numel())
            super().__call__(buffer, start)

    monkeypatch.setattr(loader_module, "FileRuns", CountedRuns)
    ruleset = load_ruleset("vllm-ep-lora")
    params = {"num_experts": 6}
    name = f"qwen3_moe/{name}"
    for rank in range(4):
        for dtype in (None, torch.float64):
            with open_checkpoint(FIXTURES / name) as checkpoint:
                bound = ruleset.bind(mesh="ep=4", params=params, config=checkpoint.config)
                plan = build_plan(bound, checkpoint.entries(), rank=rank)
                host_stats, staged_stats = LoadStats(), LoadStats()
                host = dict(iter_load(plan, checkpoint, dtype=dtype, stats=host_stats))
            with open_checkpoint(FIXTURES / name) as checkpoint:
                staged = dict(iter_load(plan, checkpoint, device="cuda", dtype=dtype, stats=staged_stats))
            assert host.keys() == staged.keys()
            for key, tensor in host.items():
                assert staged[key].dtype == tensor.dtype, key
                assert torch.equal(staged[key], tensor), (name, rank, key)
            assert staged_stats.bytes_read == host_stats.bytes_read
            assert staged_stats.files_opened == host_stats.files_opened
            assert staged_stats.num_tensors == len(host)
    # Safetensors and .bin records go straight from the file into the staging buffers.
    assert sum(direct) > 0


def test_staged_loads_cast_only_floating_point_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader_module, "CudaTransfer", LateTransfer)
    save_file(
        {"m.norm": torch.randn(5), "m.ids": torch.arange(7, dtype=torch.int32)},
        str(tmp_path / "a.safetensors"),
    )
    result = load(
        load_ruleset("vllm-ep-lora"),
        tmp_path / "a.safetensors",
        mesh="ep=2",
        rank=0,
        device="cuda",
        dtype=torch.float16,
        params={"num_experts": 2},
    )
    assert result.tensors["m.norm"].dtype == torch.float16
    assert torch.equal(result.tensors["m.ids"], torch.arange(7, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=r"cannot cast a torch\.float32 tensor to torch\.int8"):
        load(
            load_ruleset("vllm-ep-lora"),
            tmp_path / "a.safetensors",
            mesh="ep=2",
            rank=0,
            device="cuda",
            dtype=torch.int8,
            params={"num_experts": 2},
        )


def test_checksums_agree_between_batched_and_single_and_see_one_changed_word() -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(3, 5, generator=generator),
        torch.randn(70001, generator=generator).to(torch.bfloat16),
        torch.zeros((), dtype=torch.bool),
        torch.arange(3, dtype=torch.uint8),
        torch.empty(0),
        torch.randn(8, 8, generator=generator)[:, 1:3],  # not contiguous
    ]
    together = checksums(tensors)
    assert together == [checksum(t) for t in tensors]
    assert len(set(together)) == len(tensors)
    for tensor in (tensors[0], tensors[1]):
        changed = tensor.clone()
        changed.view(-1)[-1] += 1
        assert checksum(changed) != checksum(tensor)
    # Same bytes, other dtype or length: other checksums.
    assert checksum(torch.zeros(4, dtype=torch.int16)) != checksum(torch.zeros(2, dtype=torch.int32))
    assert checksum(torch.zeros(3, dtype=torch.uint8)) != checksum(torch.zeros(4, dtype=torch.uint8))


# -- on a CUDA device ------------------------------------------------------------------------------------------


@cuda
def test_cuda_loads_equal_host_loads_and_allocate_the_owned_bytes_once() -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    for name in ("qwen3_moe/lora_per_expert", "qwen3_moe/lora_fused", "qwen3_moe/lora_fused_bin"):
        host = load(ruleset, FIXTURES / name, mesh="ep=2", rank=1, params={"num_experts": 6})
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        staged = load(ruleset, FIXTURES / name, mesh="ep=2", rank=1, params={"num_experts": 6}, device="cuda")
        torch.cuda.synchronize()
        allocated = sum(_rounded(t) for t in staged.tensors.values())
        assert torch.cuda.max_memory_allocated() - before == allocated
        for key, tensor in host.tensors.items():
            assert staged.tensors[key].is_cuda
            assert torch.equal(staged.tensors[key].cpu(), tensor), (name, key)
        assert checksums(list(staged.tensors.values())) == checksums(list(host.tensors.values()))


def _rounded(tensor: torch.Tensor) -> int:
    """What the CUDA caching allocator hands out for a tensor: multiples of 512 bytes."""
    return -(-tensor.numel() * tensor.element_size() // 512) * 512
