"""`ownership load`: one rank's share written atomically to a shard file that assembles, and nothing left
behind when it fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ownership.cli import main
from ownership.formats.shardfile import assemble


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_failed_cli_load_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "w.safetensors", {"m.layers.0.mlp.experts.9.w.lora_A.weight": torch.zeros(2)})
    out = tmp_path / "out" / "rank0.safetensors"
    status = main(
        [
            "load",
            "vllm-ep-lora",
            str(path),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--param",
            "num_experts=4",
            "--out",
            str(out),
        ]
    )
    assert status == 2
    assert "captured expert 9 is out of range" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_load_writes_a_shard_that_assembles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = {f"m.layers.0.mlp.experts.{e}.w.lora_A.weight": torch.full((2, 3), float(e)) for e in range(4)}
    path = write(tmp_path / "w.safetensors", tensors)
    outs = []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.safetensors"
        assert (
            main(
                [
                    "load",
                    "vllm-ep-lora",
                    str(path),
                    "--mesh",
                    "ep=2",
                    "--rank",
                    str(rank),
                    "--param",
                    "num_experts=4",
                    "--out",
                    str(out),
                    "--format",
                    "json",
                ]
            )
            == 0
        )
        summary = json.loads(capsys.readouterr().out)
        assert summary["bytes_read"] == summary["bytes_owned"] == 48
        outs.append(out)
    joined = assemble(outs)
    assert all(torch.equal(joined[k], v) for k, v in tensors.items())
