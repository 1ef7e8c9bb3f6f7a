"""Errors of a load itself (not of the checkpoint's format): pinned messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ownership import CheckpointError, load_ruleset
from ownership.loading.loader import load


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_dtype_that_cannot_be_cast(tmp_path: Path) -> None:
    path = write(tmp_path / "w.safetensors", {"m.experts.0.w.x": torch.zeros(2)})
    with pytest.raises(CheckpointError) as info:
        load(
            load_ruleset("vllm-ep-lora"),
            path,
            mesh="ep=1",
            rank=0,
            params={"num_experts": 1},
            dtype=torch.int8,
        )
    assert str(info.value) == (
        "key 'm.experts.0.w.x': cannot cast a torch.float32 tensor to torch.int8: found torch.float32, expected a "
        "floating-point target dtype. Fix: pass a floating-point dtype such as torch.bfloat16, or none"
    )
