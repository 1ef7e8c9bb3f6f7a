"""The compiler on multi-axis rulesets: renames, pins, shards, layers, tables, drops and defaults."""

from __future__ import annotations

import pytest

from ownership import DecisionError, Mesh, MeshError, Ruleset
from ownership.placement.selection import dim_indices

RULES = """
name = "toy"
axes = ["pp", "ep", "tp"]
default = "error"

[params.num_layers]
[params.num_experts]
[params.num_heads]
default = 4
[params.num_kv_heads]
default = 2
[params.head_dim]
default = 8

[[rule]]
id = "expert"
match = "model.layers.<layer>.mlp.experts.<expert>.<proj:seg>.weight"
place = { layer = { over = "pp", strategy = "layers", size = "num_layers" }, expert = { over = "ep", size = "num_experts" } }
rename = "model.layers.{layer}.mlp.experts.{expert.local}.{proj}.weight"

[[rule]]
id = "qkv"
match = "model.layers.<layer>.self_attn.qkv_proj.weight"
layout = "out in"
place = { layer = { over = "pp", strategy = "layers", size = "num_layers" }, out = { over = "tp", strategy = "shard", parts = ["num_heads*head_dim", "num_kv_heads*head_dim", "num_kv_heads*head_dim"], heads = ["num_heads", "num_kv_heads", "num_kv_heads"] } }

[[rule]]
id = "o-proj"
match = "model.layers.<layer>.self_attn.o_proj.weight"
layout = "out in"
place = { layer = { over = "pp", strategy = "layers", size = "num_layers" }, in = { over = "tp", strategy = "shard" } }

[[rule]]
id = "embed"
match = "model.embed_tokens.weight"
layout = "vocab hidden"
pin = { pp = "first" }
place = { vocab = { over = "tp", strategy = "shard", uneven = true } }

[[rule]]
id = "head"
match = "lm_head.weight"
pin = { pp = "last" }

[[rule]]
id = "rotary"
match = "**.rotary_emb.inv_freq"
drop = true
"""

PARAMS = {"num_layers": 3, "num_experts": 4}


@pytest.fixture
def ruleset() -> Ruleset:
    return Ruleset.from_text(RULES, source="toy.toml")


def test_mesh_rank_order_is_row_major(ruleset: Ruleset) -> None:
    mesh = Mesh.parse("pp=2,ep=2,tp=2")
    assert [mesh.coords(r) for r in (0, 1, 2, 7)] == [
        {"pp": 0, "ep": 0, "tp": 0},
        {"pp": 0, "ep": 0, "tp": 1},
        {"pp": 0, "ep": 1, "tp": 0},
        {"pp": 1, "ep": 1, "tp": 1},
    ]
    with pytest.raises(MeshError, match="rank 8 is outside the mesh pp=2,ep=2,tp=2"):
        mesh.coords(8)


def test_ownership_is_the_and_over_axes(ruleset: Ruleset) -> None:
    bound = ruleset.bind(mesh="pp=2,ep=2,tp=2", params=PARAMS)
    # 3 layers over 2 stages: get_pp_indices gives [1, 2]; layer 2 is on stage 1. Expert 3 is on ep 1.
    owners = bound.owners("model.layers.2.mlp.experts.3.up_proj.weight")
    assert [rank for rank, _ in owners] == [6, 7]  # pp=1, ep=1, both tp coordinates (replicated along tp)
    assert {d.local_key for _, d in owners} == {"model.layers.2.mlp.experts.1.up_proj.weight"}
    rules = bound.for_rank(6)
    assert rules.decide("model.layers.2.mlp.experts.3.up_proj.weight").owned
    assert not rules.decide("model.layers.0.mlp.experts.3.up_proj.weight").owned  # other stage
    assert not rules.decide("model.layers.2.mlp.experts.0.up_proj.weight").owned  # other expert group


def test_fused_qkv_with_replicated_kv_heads(ruleset: Ruleset) -> None:
    # 4 q heads and 2 kv heads of size 8 over tp=4: each rank gets 1 q head, and kv head t // 2.
    bound = ruleset.bind(mesh="tp=4", params=PARAMS)
    shape = (4 * 8 + 2 * 2 * 8, 32)
    rows = {}
    for rank, decision in bound.owners("model.layers.0.self_attn.qkv_proj.weight", shape):
        rows[rank] = list(dim_indices(decision.selection[0], shape[0]))
        assert decision.selection[1] is None
    assert rows[0] == [*range(0, 8), *range(32, 40), *range(48, 56)]
    assert rows[1] == [*range(8, 16), *range(32, 40), *range(48, 56)]
    assert rows[3] == [*range(24, 32), *range(40, 48), *range(56, 64)]


def test_row_parallel_and_uneven_opt_in(ruleset: Ruleset) -> None:
    bound = ruleset.bind(mesh="pp=2,tp=2", params=PARAMS)
    o = dict(bound.owners("model.layers.0.self_attn.o_proj.weight", (32, 32)))
    assert o[0].selection == (None, ((0, 16, 1),)) and o[1].selection == (None, ((16, 32, 1),))
    with pytest.raises(DecisionError) as info:
        bound.owners("model.layers.0.self_attn.o_proj.weight", (32, 33))
    assert info.value.code == "shard-does-not-divide"
    assert str(info.value) == (
        "toy.toml: rule 'o-proj': key 'model.layers.0.self_attn.o_proj.weight': cannot shard 'in' over tp=2: size 33 does "
        "not divide over 2 coordinates: found in of size 33, expected a multiple of 2. Fix: set uneven = true on "
        "place.in to allow an uneven split, or change the mesh"
    )
    embed = dict(bound.owners("model.embed_tokens.weight", (129, 32)))
    assert sorted(embed) == [0, 1]  # first stage only
    assert embed[0].selection == (((0, 65, 1),), None) and embed[1].selection == (((65, 129, 1),), None)


def test_pins_and_drops(ruleset: Ruleset) -> None:
    bound = ruleset.bind(mesh="pp=3", params=PARAMS)
    assert [rank for rank, _ in bound.owners("lm_head.weight")] == [2]
    assert bound.owners("model.rotary_emb.inv_freq") == []
    assert not bound.for_rank(0).decide("model.rotary_emb.inv_freq").owned


def test_unmatched_key_under_default_error(ruleset: Ruleset) -> None:
    with pytest.raises(DecisionError) as info:
        ruleset.compile(mesh="pp=1", rank=0, params=PARAMS).decide("model.norm.weight")
    assert info.value.code == "unmatched-key"
    assert str(info.value) == (
        "toy.toml: key 'model.norm.weight': no rule matches this key: found no match, expected a match for one "
        "of the rules ['expert', 'qkv', 'o-proj', 'embed', 'head', 'rotary']. Fix: add a rule for it, or set "
        'default = "replicate" or "drop" in the ruleset'
    )


def test_local_name_collision_is_an_error() -> None:
    ruleset = Ruleset.from_text(
        'name = "c"\naxes = ["ep"]\n[[rule]]\nid = "flat"\nmatch = "layers.<layer>.experts.<expert>.w"\n'
        'place = { expert = { over = "ep", size = 4 } }\nrename = "experts.{expert.local}.w"\n',
        source="c.toml",
    )
    keys = ["layers.0.experts.0.w", "layers.1.experts.0.w"]
    with pytest.raises(DecisionError) as info:
        ruleset.plan(keys, mesh="ep=2", rank=0)
    assert info.value.code == "local-name-collision"
    assert "two keys get the local name 'experts.0.w' on rank 0" in str(info.value)
    with pytest.raises(DecisionError, match="two keys get the local name"):
        ruleset.plan(keys, mesh="ep=2")


def test_table_strategy_with_replicas() -> None:
    ruleset = Ruleset.from_text(
        'name = "eplb"\naxes = ["ep"]\n[params.placement]\n[[rule]]\nid = "e"\nmatch = "**.experts.<expert>.**"\n'
        'place = { expert = { over = "ep", strategy = "table", size = 4, table = "placement" } }\n'
        'rename = "experts.{expert.local}"\n',
    )
    bound = ruleset.bind(mesh="ep=2", params={"placement": [[0, 1, 2], [3, 0]]})
    assert [(rank, d.local_key) for rank, d in bound.owners("m.experts.0.w")] == [
        (0, "experts.0"),
        (1, "experts.1"),
    ]
    with pytest.raises(Exception, match="table for axis 'ep' does not fit the mesh"):
        ruleset.bind(mesh="ep=3", params={"placement": [[0, 1, 2], [3, 0]]})
    # An id twice on one coordinate would be read twice there: refused.
    with pytest.raises(Exception, match="no id twice in one list"):
        ruleset.bind(mesh="ep=2", params={"placement": [[0, 0, 1], [2, 3]]})


def test_rank_and_mesh_views_agree(ruleset: Ruleset) -> None:
    mesh = "pp=2,ep=2,tp=2"
    bound = ruleset.bind(mesh=mesh, params=PARAMS)
    keys = [
        (f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight", None)
        for layer in range(3)
        for e in range(4)
    ]
    keys += [
        ("model.layers.1.self_attn.qkv_proj.weight", (64, 32)),
        ("model.embed_tokens.weight", (128, 32)),
        ("lm_head.weight", None),
        ("model.layers.2.self_attn.o_proj.weight", (32, 32)),
    ]
    for key, shape in keys:
        from_mesh = {rank: d for rank, d in bound.owners(key, shape)}
        for rank in range(8):
            decision = bound.for_rank(rank).decide(key, shape)
            assert decision.owned is (rank in from_mesh)
            if decision.owned:
                assert decision == from_mesh[rank]
