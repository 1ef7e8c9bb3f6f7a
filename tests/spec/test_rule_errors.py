"""Bad rule files: one clear error each, naming the file, the rule id and the fix (messages pinned)."""

from __future__ import annotations

import pytest

from ownership import OwnershipError, Ruleset, RulesetError, load_ruleset

HEAD = 'name = "bad"\naxes = ["ep"]\n[params.num_experts]\n[[rule]]\nid = "routed"\n'
PLACE = 'place = { expert = { over = "ep", size = "num_experts" } }\n'
GOOD_MATCH = 'match = "**.experts.<expert>.**"\n'


def error_of(text: str) -> RulesetError:
    with pytest.raises(RulesetError) as info:
        Ruleset.from_text(text, source="bad.toml")
    return info.value


def test_unknown_field_lists_the_allowed_ones() -> None:
    error = error_of(HEAD + GOOD_MATCH + PLACE.replace("place", "placee"))
    assert error.code == "schema"
    assert str(error) == (
        "bad.toml: rule 'routed': unknown field 'placee': found 'placee', expected one of: doc, drop, id, layout, "
        "match, optional, overrides, pin, place, regex, rename, replicate, sizes, variant, when. Fix: correct its spelling (did you "
        "mean 'place'?)"
    )


def test_unknown_placement_field() -> None:
    error = error_of(HEAD + GOOD_MATCH + PLACE.replace("size", "sise"))
    assert str(error) == (
        "bad.toml: rule 'routed': unknown field 'place.expert.sise': found 'sise', expected one of: align, extra, "
        "heads, over, pad, parts, size, sizes, strategy, table, uneven. Fix: correct its spelling (did you mean 'size'?)"
    )


def test_bad_pattern_points_at_the_column() -> None:
    error = error_of(HEAD + 'match = "**.experts.<expert.**"\n' + PLACE)
    assert error.code == "pattern-error"
    assert str(error) == (
        "bad.toml: rule 'routed': bad pattern at column 12: '<' without a closing '>'. Fix: write <name>\n"
        "    **.experts.<expert.**\n"
        "               ^"
    )


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a**.b", "'**' must be a whole segment"),
        ("a.{b,c", "'{' without a closing '}'"),
        ("a.<1x>", "capture name '1x' is not an identifier"),
        ("a.<x:float>", "unknown capture type 'float'"),
        ("a.<x>.<x>", "capture 'x' appears twice"),
        ("a.{<x>,b}", "captures are not allowed inside {…}"),
        ("a.b}", "unmatched '}'"),
    ],
)
def test_pattern_errors(pattern: str, message: str) -> None:
    error = error_of(f'name = "bad"\naxes = []\n[[rule]]\nid = "r"\nmatch = "{pattern}"\n')
    assert message in str(error)
    assert error.rule == "r"


def test_unknown_axis() -> None:
    error = error_of(HEAD + GOOD_MATCH + PLACE.replace('"ep"', '"tp"'))
    assert error.code == "unknown-axis"
    assert str(error) == (
        "bad.toml: rule 'routed': unknown axis 'tp' in place.expert.over: found 'tp', expected one of the "
        "ruleset's axes ['ep']. Fix: add 'tp' to `axes` at the top of the file, or correct the spelling (did you "
        "mean 'ep'?)"
    )


def test_index_placed_but_never_captured() -> None:
    error = error_of(HEAD + 'match = "**.experts.<e>.**"\n' + PLACE)
    assert error.code == "placed-not-captured"
    assert str(error) == (
        "bad.toml: rule 'routed': index 'expert' is placed but never captured: found captures ['e'], expected "
        "<expert> in the pattern or 'expert' in the layout. Fix: capture it with <expert> in `match`, name it in "
        "`layout`, or fix the spelling"
    )


def test_missing_param_names_the_rules_and_config_keys() -> None:
    with pytest.raises(RulesetError) as info:
        load_ruleset("vllm-ep-lora").compile(mesh="ep=2", rank=0)
    assert info.value.code == "missing-param"
    message = str(info.value)
    assert message.endswith(
        "missing param 'num_experts' (used by rule 'routed-expert', 'fused-expert-lora-a', 'fused-expert-lora-b'): "
        "expected routed experts per MoE layer (the global count). Fix: pass --param num_experts=VALUE "
        "(params={'num_experts': ...} in Python), or a config.json with one of: num_experts, num_local_experts, "
        "n_routed_experts, moe_num_experts, ffn_config.moe_num_experts (an adapter's comes from its base model: "
        "--config)"
    )
    assert message.startswith("vllm-ep-lora.toml (built-in): missing param")


def test_params_come_from_config_json_spellings() -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    for config in (
        {"num_experts": 8},
        {"num_local_experts": 8},
        {"n_routed_experts": 8},
        {"moe_num_experts": 8},
        {"ffn_config": {"moe_num_experts": 8}},
    ):
        assert ruleset.resolve_params(config=config)["num_experts"] == 8
    # An explicit value wins over the config.
    assert ruleset.resolve_params({"num_experts": 4}, config={"num_experts": 8})["num_experts"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD, "give exactly one of `match` (a template) or `regex`"),
        (
            'name = "x"\naxes = []\n[[rule]]\nid = "a"\nmatch = "x"\n[[rule]]\nid = "a"\nmatch = "y"\n',
            "duplicate rule id 'a': found rule #2 reuses it",
        ),
        ("name = \n", "not valid TOML"),
        (
            HEAD + GOOD_MATCH + PLACE.replace('size = "num_experts"', 'size = "num_expert"'),
            "rule refers to undeclared param 'num_expert'",
        ),
        (
            HEAD
            + GOOD_MATCH
            + PLACE.replace('size = "num_experts"', 'size = "num_experts", strategy = "lineer"'),
            "unknown strategy 'lineer' for index 'expert'",
        ),
        (HEAD + GOOD_MATCH + 'place = { expert = { over = "ep" } }\n', "captured index 'expert' has no size"),
        (HEAD + GOOD_MATCH + PLACE + 'rename = "x.{exprt}"\n', "rename refers to {exprt}"),
        (
            HEAD + 'match = "**.<name:seg>.w"\nplace = { name = { over = "ep", size = 4 } }\n',
            "index 'name' is a text capture and cannot be placed",
        ),
        (HEAD + 'match = "**.w"\nlayout = "out (in"\n', "bad layout at column 8: '(' without ')'"),
    ],
)
def test_other_rule_file_errors(text: str, message: str) -> None:
    assert message in str(error_of(text))


def test_every_error_is_an_ownership_error() -> None:
    assert issubclass(RulesetError, OwnershipError)


def test_kv_heads_that_cannot_be_replicated_evenly_say_to_change_the_mesh() -> None:
    bound = load_ruleset("llama").bind(
        mesh="tp=3", params={"num_layers": 2, "num_heads": 6, "num_kv_heads": 2}
    )
    with pytest.raises(OwnershipError) as info:
        bound.owners("model.layers.0.self_attn.k_proj.weight", (16, 32))
    assert str(info.value) == (
        "llama.toml (built-in): rule 'attention-kv': key 'model.layers.0.self_attn.k_proj.weight': cannot shard "
        "'kv_heads' over tp=3: 3 coordinates cannot replicate 2 heads evenly: found kv_heads of size 2, expected 3 "
        "coordinates a multiple of the 2 heads (each head on the same number of coordinates), or a divisor of "
        "them. Fix: change the size of 'tp' in the mesh"
    )
