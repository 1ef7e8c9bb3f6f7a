"""Reconstruction on checkpoints made by transformers and peft: every rank's load, joined, is the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ownership import load_ruleset
from ownership.formats import open_checkpoint
from ownership.formats.shardfile import assemble, save_shard
from ownership.formats.spans import selection_read_bytes, selection_read_count
from ownership.loading.loader import load
from ownership.placement.selection import dim_indices
from ownership.placement.strategy import make_strategy
from tests.conftest import FIXTURES

CHECKPOINTS = [
    "qwen3_moe/base",  # sharded safetensors + index (transformers 5)
    "qwen3_moe/base_bin",  # sharded .bin + index (transformers 4)
    "qwen3_moe/lora_per_expert",
    "qwen3_moe/lora_per_expert_bin",
    "qwen3_moe/lora_fused",
    "qwen3_moe/lora_fused_bin",
    "mixtral/base",
    "mixtral/lora_per_expert",
    "mixtral/lora_fused",
]


def original(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {e.key: ckpt.read(e.key) for e in ckpt.entries()}


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("ep", [2, 3, 4])
@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
def test_every_rank_joined_is_the_original(tmp_path: Path, name: str, ep: int, strategy: str) -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    folder = FIXTURES / name
    num_experts = 6  # the fixtures' expert count; also read from config.json where the folder has one
    placement = make_strategy(strategy, num_ids=num_experts, num_coords=ep)
    shards = []
    for rank in range(ep):
        result = load(
            ruleset,
            folder,
            mesh=f"ep={ep}",
            rank=rank,
            params={"num_experts": num_experts, "expert_strategy": strategy},
        )
        mine = set(placement.owned(rank))
        pieces = []
        for entry, decision in result.plan.owned_entries():
            tensor = result.tensors[decision.local_key or decision.key]
            if decision.rule == "routed-expert":
                assert decision.captures["expert"] in mine  # no rank holds another rank's expert
            elif decision.rule.startswith("fused-expert"):
                layout_dim = 0 if decision.rule.endswith("-a") else 1
                size = entry.shape[layout_dim]
                indices = list(dim_indices(decision.selection[layout_dim], size))
                r = size // num_experts
                experts = {i // r for i in indices} if layout_dim == 0 else {i % num_experts for i in indices}
                assert experts == mine and len(indices) == r * len(mine)
            pieces.append((decision, entry.shape, tensor))
        shards.append(save_shard(tmp_path / f"rank{rank}.safetensors", pieces, info={"rank": rank}))
        # Exactly the owned bytes, but spans of whole pages where a column selection forces it (fused lora_B's
        # strided columns); never more than the selected rows whole.
        expected_read = sum(
            selection_read_bytes(d.selection, shape=e.shape, itemsize=e.itemsize)
            for e, d in result.plan.owned_entries()
        )
        assert result.stats.bytes_read == expected_read
        assert (
            result.stats.bytes_owned
            <= expected_read
            <= sum(
                selection_read_count(d.selection, e.shape) * e.itemsize
                for e, d in result.plan.owned_entries()
            )
        )
        assert result.stats.bytes_read <= result.stats.bytes_total
    joined = assemble(shards)
    expected = original(folder)
    assert joined.keys() == expected.keys()
    for key, tensor in expected.items():
        assert joined[key].dtype == tensor.dtype
        assert torch.equal(
            joined[key].view(torch.uint8) if tensor.dim() else joined[key],
            tensor.view(torch.uint8) if tensor.dim() else tensor,
        ), key
