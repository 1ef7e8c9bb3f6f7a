"""The built-in vllm-ep-lora ruleset against vLLM's measured behaviour (../shared/reference/vllm-ep-lora.md)."""

from __future__ import annotations

import itertools

import pytest

from ownership import DecisionError, load_ruleset
from ownership.placement.strategy import linear_count, linear_start

P = "base_model.model.model.layers.0.mlp."

# (key, remote on rank 0, remote on rank 1) with L = 64, 128 experts: the reference's vectors.
VECTORS = [
    (P + "experts.0.gate_proj.lora_A.weight", False, True),
    (P + "experts.63.down_proj.lora_B.weight", False, True),
    (P + "experts.64.up_proj.lora_A.weight", True, False),
    ("model.layers.3.mlp.experts.100.gate_proj.lora_A.weight", True, False),
    (P + "shared_experts.gate_proj.lora_A.weight", False, False),
    (P + "shared_expert.gate_proj.lora_A.weight", False, False),
    (P + "gate.lora_A.weight", False, False),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", False, False),
    (P + "experts.base_layer.lora_A.weight", False, False),
    (P + "experts.lora_A.weight", False, False),
    (P + "experts.7", False, False),
    ("experts.100.gate_proj.lora_A.weight", False, False),
    ("base_model.model.model.layers.0.block_sparse_moe.experts.5.w1.lora_A.weight", False, True),
    (P + "experts.+5.gate_proj.lora_A.weight", False, False),
    (P + "experts.007.gate_proj.lora_A.weight", False, True),
    (P + "experts.500.gate_proj.lora_A.weight", True, True),
    ("base_model.model.language_model.layers.0.mlp.experts.100.gate_proj.lora_A.weight", True, False),
    (P + "experts.1.experts.100.gate_proj.lora_A.weight", False, True),
    # Not in the reference's table, from its rule: only the first `.experts.` counts.
    (P + "experts.x.experts.100.gate_proj.lora_A.weight", False, False),
    (P + "experts.experts.5.gate_proj.lora_A.weight", False, False),
]


def vllm_is_remote(key: str, ep_rank: int, local_num_experts: int) -> bool:
    """vLLM's predicate as the reference describes it, for comparison."""
    idx = key.find(".experts.")
    if idx < 0:
        return False
    rest = key[idx + len(".experts.") :]
    dot = rest.find(".")
    if dot < 0 or not rest[:dot].isdigit():
        return False
    expert = int(rest[:dot])
    return not (ep_rank * local_num_experts <= expert < (ep_rank + 1) * local_num_experts)


@pytest.fixture(scope="module")
def ruleset():  # type: ignore[no-untyped-def]
    return load_ruleset("vllm-ep-lora")


# Fused keys are matched by rules with a layout, so they need a shape; any fitting shape will do here.
SHAPES = {"lora_A.weight": (128 * 4, 32), "lora_B.weight": (64, 4 * 128)}


def _shape(key: str) -> tuple[int, int] | None:
    if (
        ".experts.base_layer." in key
        or key.endswith("experts.lora_A.weight")
        or key.endswith("experts.lora_B.weight")
    ):
        return SHAPES[key[-13:]]
    return None


@pytest.mark.parametrize(("key", "remote0", "remote1"), VECTORS)
def test_vllm_contiguous_reproduces_every_vector(ruleset, key: str, remote0: bool, remote1: bool) -> None:  # type: ignore[no-untyped-def]
    bound = ruleset.bind(mesh="ep=2", params={"num_experts": 128, "expert_strategy": "vllm_contiguous"})
    for rank, remote in ((0, remote0), (1, remote1)):
        decision = bound.for_rank(rank).decide(key, _shape(key))
        if _shape(key) is None:
            assert decision.owned is not remote, (key, rank)
        else:
            # vLLM loads fused tensors whole; we own a block of them on every rank instead (never "remote").
            assert decision.owned


def test_vllm_contiguous_matches_predicate_for_uneven_counts(ruleset) -> None:  # type: ignore[no-untyped-def]
    for num_experts, ep in [(10, 4), (130, 4), (6, 4), (16, 3)]:
        bound = ruleset.bind(
            mesh=f"ep={ep}", params={"num_experts": num_experts, "expert_strategy": "vllm_contiguous"}
        )
        for rank in range(ep):
            local = linear_count(num_experts, ep, rank)
            rules = bound.for_rank(rank)
            for expert in range(num_experts + 3):
                key = f"m.layers.0.mlp.experts.{expert}.up_proj.lora_A.weight"
                assert rules.decide(key).owned is not vllm_is_remote(key, rank, local)


def test_default_mode_rejects_out_of_range_index(ruleset) -> None:  # type: ignore[no-untyped-def]
    rules = ruleset.compile(mesh="ep=2", rank=0, params={"num_experts": 128})
    with pytest.raises(DecisionError) as info:
        rules.decide(P + "experts.500.gate_proj.lora_A.weight")
    assert str(info.value) == (
        "vllm-ep-lora.toml (built-in): rule 'routed-expert': key 'base_model.model.model.layers.0.mlp.experts.500.gate_proj.lora_A.weight': "
        "captured expert 500 is out of range: found 500, expected 0..127 (num_experts=128). "
        "Fix: check the param behind the size of 'expert' against the checkpoint"
    )


def qwen3_30b_keys(*, num_layers: int = 48, num_experts: int = 128) -> list[str]:
    """A Qwen3-30B-A3B-shaped adapter: attention, router `gate` and per-expert LoRA, as in vLLM's own test."""
    keys = []
    for layer in range(num_layers):
        base = f"base_model.model.model.layers.{layer}"
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.append(f"{base}.self_attn.{module}")
        keys.append(f"{base}.mlp.gate")
        for expert in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys.append(f"{base}.mlp.experts.{expert}.{proj}")
    return [f"{module}.lora_{ab}.weight" for module in keys for ab in "AB"]


@pytest.mark.parametrize("strategy", ["vllm_contiguous", "linear"])
def test_qwen3_30b_module_counts(ruleset, strategy: str) -> None:  # type: ignore[no-untyped-def]
    keys = qwen3_30b_keys()
    assert len(keys) // 2 == 18_672
    plan = ruleset.plan(keys, mesh="ep=2", params={"num_experts": 128, "expert_strategy": strategy})
    for rank_plan in plan.ranks:
        assert len(rank_plan.owned) // 2 == 9_456 == 64 * 3 * 48 + 5 * 48


EXPERT_COUNTS = [6, 8, 10, 16, 128, 130, 256]
EP_SIZES = [1, 2, 3, 4, 8, 16]


def base_layer_linear(num_experts: int, ep: int, rank: int) -> list[int]:
    """vLLM determine_expert_map, linear: the formula from the reference, written independently."""
    base, extra = divmod(num_experts, ep)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return list(range(start, start + count))


@pytest.mark.parametrize(("num_experts", "ep"), list(itertools.product(EXPERT_COUNTS, EP_SIZES)))
def test_default_modes_follow_the_base_layer(ruleset, num_experts: int, ep: int) -> None:  # type: ignore[no-untyped-def]
    keys = [f"m.layers.0.mlp.experts.{e}.down_proj.lora_B.weight" for e in range(num_experts)]
    sets = {}
    for strategy in ("linear", "round_robin"):
        plan = ruleset.plan(
            keys, mesh=f"ep={ep}", params={"num_experts": num_experts, "expert_strategy": strategy}
        )
        for rank in range(ep):
            owned = [int(d.captures["expert"]) for d in plan.ranks[rank].owned]
            expected = (
                base_layer_linear(num_experts, ep, rank)
                if strategy == "linear"
                else list(range(rank, num_experts, ep))
            )
            assert owned == expected
            # The per-rank compiled decision agrees with the whole-mesh plan.
            rules = ruleset.compile(
                mesh=f"ep={ep}", rank=rank, params={"num_experts": num_experts, "expert_strategy": strategy}
            )
            assert [i for i, k in enumerate(keys) if rules.decide(k).owned] == sorted(expected)
            sets[(strategy, rank)] = set(owned)
        contiguous = ruleset.plan(
            keys, mesh=f"ep={ep}", params={"num_experts": num_experts, "expert_strategy": "vllm_contiguous"}
        )
        if num_experts % ep == 0:
            for rank in range(ep):
                assert {int(d.captures["expert"]) for d in contiguous.ranks[rank].owned} == sets[
                    ("linear", rank)
                ]


def test_reference_disagreements(ruleset) -> None:  # type: ignore[no-untyped-def]
    """The reference's table of where PR #42737 and the base layer disagree."""
    cases = [
        (10, 4, 2, [6, 7], [4, 5]),
        (10, 4, 3, [8, 9], [6, 7]),
        (130, 4, 2, list(range(66, 98)), list(range(64, 96))),
    ]
    for num_experts, ep, rank, base_owns, lora_keeps in cases:
        keys = [f"m.layers.0.mlp.experts.{e}.w1.lora_A.weight" for e in range(num_experts)]
        for strategy, expected in (("linear", base_owns), ("vllm_contiguous", lora_keeps)):
            rules = ruleset.compile(
                mesh=f"ep={ep}", rank=rank, params={"num_experts": num_experts, "expert_strategy": strategy}
            )
            assert [e for e, k in enumerate(keys) if rules.decide(k).owned] == expected
    assert linear_start(130, 4, 2) == 66


def test_fused_lora_follows_expert_placement(ruleset) -> None:  # type: ignore[no-untyped-def]
    num_experts, r = 6, 4
    bound = ruleset.bind(mesh="ep=4", params={"num_experts": num_experts})
    for rank in range(4):
        experts = base_layer_linear(num_experts, 4, rank)
        a = bound.for_rank(rank).decide("m.mlp.experts.base_layer.lora_A.weight", (num_experts * r, 32))
        rows = [i for run in a.selection[0] for i in range(*run)]
        assert rows == [e * r + j for e in experts for j in range(r)]
        b = bound.for_rank(rank).decide("m.mlp.experts.lora_B.weight", (48, r * num_experts))
        cols = [i for run in b.selection[1] for i in range(*run)]
        assert b.selection[0] is None
        assert cols == [j * num_experts + e for j in range(r) for e in experts]
