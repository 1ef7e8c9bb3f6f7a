"""`silent-replication`: which whole tensors carry an axis's index, and which are rightly whole."""

from __future__ import annotations

from ownership.lint import lint

HEAD = """
name = "t"
axes = ["ep", "tp"]
default = "replicate"
[params.num_experts]
default = 4
"""
PER_EXPERT = """
[[rule]]
id = "expert"
match = "**.experts.<expert>.**"
place = { expert = { over = "ep", size = "num_experts" } }
"""
BLOCKS = """
[[rule]]
id = "blocks"
match = "**.mlp.mlp1_weight.blocks"
layout = "expert out k block"
place = { expert = { over = "ep", size = "num_experts" } }
"""
Q = """
[[rule]]
id = "q"
match = "**.q_proj.weight"
layout = "out in"
place = { out = { over = "tp", strategy = "shard" } }
[[rule]]
id = "o"
match = "**.o_proj.weight"
layout = "out in"
place = { in = { over = "tp", strategy = "shard" } }
"""


def replicated(text: str, keys: list[tuple[str, str, list[int]]], mesh: str) -> dict[str, list[str]]:
    """rule -> keys the check names, over every silent-replication finding."""
    report = lint("t", keys, mesh=mesh, text=text)
    out: dict[str, list[str]] = {}
    for finding in report.findings:
        if finding.check == "silent-replication":
            out.setdefault(finding.rule or "", []).extend(finding.keys)
    return out


def test_router_weights_and_score_biases_are_rightly_whole() -> None:
    keys = [
        ("m.layers.0.mlp.experts.0.w1.weight", "F32", [8, 8]),
        ("m.layers.0.mlp.gate.weight", "F32", [4, 8]),  # [E, H]: a router, whole in vLLM
        ("m.layers.0.mlp.gate.e_score_correction_bias", "F32", [4]),
    ]
    assert replicated(HEAD + PER_EXPERT, keys, "ep=2") == {}


def test_a_bias_beside_partitioned_blocks_carries_the_expert_index() -> None:
    """GPT-OSS's original names: `mlp.mlp1_bias` [E, 2I] sits beside `mlp.mlp1_weight.blocks`, which is partitioned
    over ep; its router `mlp.gate.weight` [E, H] has nothing partitioned under `mlp.gate`."""
    keys = [
        ("block.0.mlp.mlp1_weight.blocks", "U8", [4, 16, 2, 16]),
        ("block.0.mlp.mlp1_bias", "F32", [4, 16]),
        ("block.0.mlp.gate.weight", "F32", [4, 8]),
    ]
    assert replicated(HEAD + BLOCKS, keys, "ep=2") == {"<default>": ["block.0.mlp.mlp1_bias"]}


def test_three_dims_led_by_the_expert_count_carry_it_without_an_experts_segment() -> None:
    keys = [("block.0.mlp.mlp2_weight.blocks", "U8", [4, 8, 2, 16])]
    assert replicated(HEAD + BLOCKS, keys, "ep=2") == {"<default>": ["block.0.mlp.mlp2_weight.blocks"]}


def test_a_column_bias_beside_its_cut_weight_is_flagged_a_row_bias_is_not() -> None:
    keys = [
        ("m.self_attn.q_proj.weight", "F32", [8, 8]),
        ("m.self_attn.q_proj.bias", "F32", [8]),
        ("m.self_attn.o_proj.weight", "F32", [8, 8]),
        ("m.self_attn.o_proj.bias", "F32", [8]),
    ]
    assert replicated(HEAD + Q, keys, "tp=2") == {"<default>": ["m.self_attn.q_proj.bias"]}
    assert replicated(HEAD + Q, keys, "tp=1") == {}


def test_a_rule_that_means_to_replicate_says_so() -> None:
    shared = '[[rule]]\nid = "shared-a"\nmatch = "**.experts.mlp.lora_A.weight"\nreplicate = ["ep"]\n'
    keys = [("m.experts.mlp.lora_A.weight", "F32", [4, 8])]
    assert replicated(HEAD + PER_EXPERT + shared, keys, "ep=2") == {}
    assert replicated(HEAD + PER_EXPERT, keys, "ep=2") == {"<default>": ["m.experts.mlp.lora_A.weight"]}


def test_names_only_keys_are_judged_by_their_names() -> None:
    keys = ["m.layers.0.mlp.experts.0.w1.weight", "m.layers.0.mlp.experts.gate_up_proj"]
    assert replicated(HEAD + PER_EXPERT, keys, "ep=2") == {
        "<default>": ["m.layers.0.mlp.experts.gate_up_proj"]
    }  # type: ignore[arg-type]
