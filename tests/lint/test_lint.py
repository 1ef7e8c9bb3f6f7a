"""The linter: every check fires on a ruleset made to trigger it and stays quiet on its fixed twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownership.cli import main
from ownership.lint import lint, to_json, to_sarif, to_text
from ownership.lint.finding import CHECKS
from ownership.spec.builtin import builtin_path
from tests.conftest import FIXTURES

HEAD = 'name = "t"\naxes = ["ep", "tp"]\ndefault = "replicate"\n[params.num_experts]\ndefault = 4\n'
EXPERT = (
    '[[rule]]\nid = "expert"\nmatch = "**.experts.<expert>.**"\n'
    'place = { expert = { over = "ep", size = "num_experts" } }\n'
)
KEYS = [f"m.layers.0.mlp.experts.{e}.w1.lora_{ab}.weight" for e in range(4) for ab in "AB"]


def checks(
    text: str | None,
    keys: list[object] | None = KEYS,
    mesh: str = "ep=2",
    config: dict[str, object] | None = None,
    ruleset: str = "t",
    **params: object,
) -> dict[str, str]:
    """check id -> the text of its first finding."""
    report = lint(ruleset, keys, mesh=mesh, params=params, config=config, text=text)
    out: dict[str, str] = {}
    for finding in report.findings:
        out.setdefault(finding.check, finding.text())
    return out


def errors(text: str, keys: list[object] | None = KEYS, mesh: str = "ep=2", **params: object) -> set[str]:
    report = lint("t", keys, mesh=mesh, params=params, text=text)
    return {f.check for f in report.findings if f.level == "error"}


FUSED_A = """
[[rule]]
id = "fused-a"
match = "**.experts.lora_A.weight"
layout = "(expert r) in"
place = { expert = { over = "ep", size = "num_experts" } }
"""

FUSED_KEY = ("m.layers.0.mlp.experts.gate_up_proj", "F32", [4, 8, 6])
FUSED_RULE = """
[[rule]]
id = "fused"
match = "**.experts.gate_up_proj"
layout = "expert hidden inter"
place = { expert = { over = "ep", size = "num_experts" } }
"""
ORIENTATIONS = """
[[rule]]
id = "fused"
match = "**.experts.gate_up_proj"
layout = ["expert hidden inter", "expert inter hidden"]
place = { inter = { over = "tp", strategy = "shard" } }
"""
GPT_OSS = {
    "model_type": "gpt_oss",
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
}
FP8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
FP8_LLAMA = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, **FP8}
DOWN = "model.layers.0.mlp.down_proj"
SCALES_FIRST = (
    HEAD
    + """
[[rule]]
id = "scales"
match = "**.weight_scale_inv"
[[rule]]
id = "q"
match = "**.q_proj.weight"
layout = "out in"
place = { out = { over = "tp", strategy = "shard" } }
"""
)
SHAPED_KEYS = [(f"m.layers.0.mlp.experts.{e}.w1.weight", "F32", [8, 8]) for e in range(4)]

# (check id, a ruleset/keys that trigger it, its fixed twin, the expected text)
CASES = [
    (
        "unused-capture",
        dict(text=HEAD + EXPERT + '[[rule]]\nid = "proj"\nmatch = "**.<proj:seg>.lora_A.weight"\n'),
        dict(text=HEAD + EXPERT + '[[rule]]\nid = "proj"\nmatch = "**.*.lora_A.weight"\n'),
        "warning unused-capture: rule 'proj': capture 'proj' is neither placed nor used by a rename. Fix: place it, "
        "use it in `rename`, or match it with * instead of <proj>",
    ),
    (
        "never-matches",
        dict(text=HEAD + '[[rule]]\nid = "all"\nmatch = "**"\n' + EXPERT),
        dict(text=HEAD + EXPERT + '[[rule]]\nid = "all"\nmatch = "**"\n'),
        "warning never-matches: rule 'expert': every example key of its pattern is taken first by rule all. Fix: "
        "move this rule above the broader one, or narrow the broader pattern",
    ),
    (
        "backtracking-risk",
        dict(text=HEAD + "[[rule]]\nid = \"slow\"\nregex = '(?:\\w+\\.?)*\\.weight'\n"),
        dict(text=HEAD + "[[rule]]\nid = \"slow\"\nregex = '(?:[^.]+\\.)*weight'\n"),
        "error backtracking-risk: rule 'slow': raw regex can backtrack exponentially: nested quantifier "
        "'(?:\\\\w+\\\\.?)*'. Fix: make the inner quantifier possessive (x++) or the group atomic ((?>...)), or use a "
        "template",
    ),
    (
        "duplicate-rule-id",
        dict(text=HEAD + EXPERT + EXPERT.replace("**.experts", "**.mlp.experts")),
        dict(
            text=HEAD
            + EXPERT
            + EXPERT.replace("**.experts", "**.mlp.experts").replace('"expert"\nmatch', '"e2"\nmatch')
        ),
        "error duplicate-rule-id: rule 'expert': duplicate rule id 'expert' (found rule #2 reuses it, expecte"
        "d unique rule ids). Fix: rename one of the rules",
    ),
    (
        "schema",
        dict(text=HEAD + EXPERT.replace("place =", "placee =")),
        dict(text=HEAD + EXPERT),
        "error schema: rule 'expert': unknown field 'placee' (found 'placee', expected one of: doc, drop, id,"
        " layout, match, optional, overrides, pin, place, regex, rename, replicate, sizes, variant, when). Fix: correct "
        "its spelling (did you mean 'place'?)",
    ),
    (
        "missing-param",
        dict(text=HEAD.replace("default = 4\n", "") + EXPERT),
        dict(text=HEAD + EXPERT),
        "error missing-param: missing param 'num_experts' (used by rule 'expert'). Fix: pass --param "
        "num_experts=VALUE (params={'num_experts': ...} in Python)",
    ),
    (
        "dead-rule",
        dict(text=HEAD + EXPERT + '[[rule]]\nid = "router"\nmatch = "**.mlp.gate.lora_A.weight"\n'),
        dict(
            text=HEAD + EXPERT + '[[rule]]\nid = "router"\nmatch = "**.mlp.gate.lora_A.weight"\n',
            keys=[*KEYS, "m.layers.0.mlp.gate.lora_A.weight"],
        ),
        "error dead-rule: rule 'router': pattern '**.mlp.gate.lora_A.weight' matches no key of the checkpoint. Fix: "
        "fix the pattern against the checkpoint's keys, or remove the rule",
    ),
    (
        "shadowed-rule",
        dict(text=HEAD + '[[rule]]\nid = "w1"\nmatch = "**.w1.**"\n' + EXPERT),
        dict(text=HEAD + EXPERT + '[[rule]]\nid = "w1"\nmatch = "**.w1.**"\n', keys=[*KEYS, "m.w1.x"]),
        "error shadowed-rule: rule 'expert': keys 'm.layers.0.mlp.experts.0.w1.lora_A.weight', "
        "'m.layers.0.mlp.experts.0.w1.lora_B.weight', 'm.layers.0.mlp.experts.1.w1.lora_A.weight' (+5 more): every "
        "key it matches is taken first by rule w1. Fix: move it above the rule that takes its keys, or narrow that "
        "rule's pattern",
    ),
    (
        "unmatched-key",
        dict(text=HEAD.replace('"replicate"', '"error"') + EXPERT, keys=[*KEYS, "m.norm.weight"]),
        dict(
            text=HEAD.replace('"replicate"', '"error"')
            + EXPERT
            + '[[rule]]\nid = "norm"\nmatch = "**.norm.weight"\n',
            keys=[*KEYS, "m.norm.weight"],
        ),
        "error unmatched-key: key 'm.norm.weight': 1 keys match no rule and the ruleset's default is \"error\". Fix: "
        'add rules for them, or set default = "replicate" or "drop"',
    ),
    (
        "limit",
        dict(text=HEAD + EXPERT, num_experts=10**12),
        dict(text=HEAD + EXPERT, num_experts=4),
        "error limit: rule 'expert': the size of index 'expert' is over the limit (found num_experts=10000000"
        "00000 ids, expected at most 1,048,576 (MAX_INDEX_SIZE)). Fix: check the param behind the size of 'ex"
        "pert' against the model's config; if it is right, raise ownership.limits.MAX_INDEX_SIZE (docs/limits"
        ".md)",
    ),
    (
        "index-out-of-range",
        dict(text=HEAD + EXPERT, num_experts=3),
        dict(text=HEAD + EXPERT, num_experts=4),
        "error index-out-of-range: rule 'expert': keys 'm.layers.0.mlp.experts.3.w1.lora_A.weight', "
        "'m.layers.0.mlp.experts.3.w1.lora_B.weight': captured expert 3 is out of range (found 3, expected 0..2 "
        "(num_experts=3)) in 2 keys. Fix: check the param behind the size of 'expert' against the checkpoint",
    ),
    (
        "layout-mismatch",
        dict(
            text=HEAD + '[[rule]]\nid = "a"\nmatch = "**.lora_A.weight"\nlayout = "(expert r) in"\n'
            'place = { expert = { over = "ep", size = "num_experts" } }\n',
            keys=[("m.lora_A.weight", "F32", [6, 8])],
        ),
        dict(
            text=HEAD + '[[rule]]\nid = "a"\nmatch = "**.lora_A.weight"\nlayout = "(expert r) in"\n'
            'place = { expert = { over = "ep", size = "num_experts" } }\n',
            keys=[("m.lora_A.weight", "F32", [8, 8])],
        ),
        "error layout-mismatch: rule 'a': key 'm.lora_A.weight': dim (expert r) of layout '(expert r) in' does not "
        "fit the shape (found size 6, expected a multiple of expert=4). Fix: check the params (e.g. num_experts) "
        "against the checkpoint, or the rule's layout",
    ),
    (
        "shape-needed",
        dict(
            text=HEAD + '[[rule]]\nid = "a"\nmatch = "**.lora_A.weight"\nlayout = "r in"\n'
            'place = { in = { over = "tp", strategy = "shard" } }\n',
            keys=["m.lora_A.weight"],
            mesh="tp=2",
        ),
        dict(
            text=HEAD + '[[rule]]\nid = "a"\nmatch = "**.lora_A.weight"\nlayout = "r in"\n'
            'place = { in = { over = "tp", strategy = "shard" } }\n',
            keys=[("m.lora_A.weight", "F32", [4, 8])],
            mesh="tp=2",
        ),
        "error shape-needed: rule 'a': key 'm.lora_A.weight': this rule cuts the tensor over tp and needs "
        "its shape (expected a shape). Fix: give the tensor's shape: plan or lint a checkpoint (its headers h"
        "ave it) or a key list with shapes (key<TAB>dtype<TAB>[d0,d1]), pass shape= in Python, or --shape to "
        "`ownership explain`",
    ),
    (
        "shard-does-not-divide",
        dict(
            text=HEAD + '[[rule]]\nid = "a"\nmatch = "**.lora_A.weight"\nlayout = "r in"\n'
            'place = { in = { over = "tp", strategy = "shard" } }\n',
            keys=[("m.lora_A.weight", "F32", [4, 9])],
            mesh="tp=2",
        ),
        dict(
            text=HEAD + '[[rule]]\nid = "a"\nmatch = "**.lora_A.weight"\nlayout = "r in"\n'
            'place = { in = { over = "tp", strategy = "shard", uneven = true } }\n',
            keys=[("m.lora_A.weight", "F32", [4, 9])],
            mesh="tp=2",
        ),
        "error shard-does-not-divide: rule 'a': key 'm.lora_A.weight': cannot shard 'in' over tp=2: size 9 does not "
        "divide over 2 coordinates (found in of size 9, expected a multiple of 2). Fix: set uneven = true on place.in "
        "to allow an uneven split, or change the mesh",
    ),
    (
        "integrity",
        dict(
            text=HEAD
            + EXPERT.replace('size = "num_experts"', 'size = "num_experts", strategy = "vllm_contiguous"'),
            keys=[f"m.experts.{e}.w.lora_A.weight" for e in range(10)],
            mesh="ep=4",
            num_experts=10,
        ),
        dict(
            text=HEAD + EXPERT,
            keys=[f"m.experts.{e}.w.lora_A.weight" for e in range(10)],
            mesh="ep=4",
            num_experts=10,
        ),
        "error integrity: rule 'expert': keys 'm.experts.8.w.lora_A.weight', 'm.experts.9.w.lora_A.weight': some "
        "expert ids are owned by no rank: 2 keys would be lost. Fix: use a strategy that covers every expert "
        "(linear, round_robin), or check the size",
    ),
    (
        "local-name-collision",
        dict(text=HEAD + EXPERT.replace("place =", 'rename = "experts.{expert.local}.w"\nplace =')),
        dict(
            text=HEAD
            + EXPERT.replace("place =", 'rename = "{head}.experts.{expert.local}.{tail}"\nplace =').replace(
                "**.experts.<expert>.**", "<head:path>.experts.<expert>.<tail:path>"
            )
        ),
        "error local-name-collision: keys 'm.layers.0.mlp.experts.0.w1.lora_A.weight', "
        "'m.layers.0.mlp.experts.0.w1.lora_B.weight': 'm.layers.0.mlp.experts.0.w1.lora_A.weight' and "
        "'m.layers.0.mlp.experts.0.w1.lora_B.weight' both get the local name 'experts.0.w' on rank 0. Fix: make the "
        "rename keep what tells the keys apart (e.g. {layer})",
    ),
    (
        "lora-rank",
        dict(
            text=HEAD + FUSED_A,
            keys=[("m.layers.0.mlp.experts.lora_A.weight", "F32", [24, 32])],
            config={"r": 4, "rank_pattern": {"gate_up_proj": 8}},
            num_experts=2,
        ),
        dict(
            text=HEAD + FUSED_A,
            keys=[("m.layers.0.mlp.experts.lora_A.weight", "F32", [24, 32])],
            config={"r": 4, "rank_pattern": {"gate_up_proj": 8}},
            num_experts=6,
        ),
        "error lora-rank: rule 'fused-a': key 'm.layers.0.mlp.experts.lora_A.weight': the layout gives r = 12, but "
        "the adapter's ranks are [4, 8] (r and rank_pattern). Fix: check the param behind the factor folded with r "
        "(e.g. num_experts) against the model, or the layout against the tensor",
    ),
    (
        "lora-pair",
        dict(
            text=HEAD
            + EXPERT.replace("**.experts.<expert>.**", "**.experts.<expert>.*.lora_A.weight")
            + EXPERT.replace('"expert"\nmatch', '"expert-b"\nmatch')
            .replace("**.experts.<expert>.**", "**.experts.<expert>.*.lora_B.weight")
            .replace('size = "num_experts"', 'size = "num_experts", strategy = "round_robin"')
        ),
        dict(
            text=HEAD
            + EXPERT.replace("**.experts.<expert>.**", "**.experts.<expert>.*.lora_A.weight")
            + EXPERT.replace('"expert"\nmatch', '"expert-b"\nmatch').replace(
                "**.experts.<expert>.**", "**.experts.<expert>.*.lora_B.weight"
            )
        ),
        "error lora-pair: rule 'expert / expert-b': keys 'm.layers.0.mlp.experts.1.w1.lora_A.weight', "
        "'m.layers.0.mlp.experts.1.w1.lora_B.weight': lora_A and lora_B are on different ranks (lora_A only on [0], "
        "lora_B only on [1]). Fix: place lora_A and lora_B of a module with the same strategy and split "
        "(column: B on out; row: A on in; the r dim alike on both)",
    ),
    (
        "wrong-ruleset",
        dict(
            text=None, ruleset="transformers-moe", keys=["model.layers.0.mlp.router.weight"], config=GPT_OSS
        ),
        dict(text=None, ruleset="gpt-oss", keys=["model.layers.0.mlp.router.weight"], config=GPT_OSS),
        "warning wrong-ruleset: ruleset 'transformers-moe' is not made for model_type 'gpt_oss'; the built-in for it is "
        "'gpt-oss'. Fix: lint with 'gpt-oss' (or `auto`, which picks it from the config)",
    ),
    (
        "quant-misaligned",
        dict(
            text=None,
            ruleset="llama",
            keys=[(f"{DOWN}.weight", "F8_E4M3", [32, 384]), (f"{DOWN}.weight_scale_inv", "F32", [1, 3])],
            config=FP8_LLAMA,
            mesh="tp=2",
        ),
        dict(
            text=None,
            ruleset="llama",
            keys=[(f"{DOWN}.weight", "F8_E4M3", [32, 512]), (f"{DOWN}.weight_scale_inv", "F32", [1, 4])],
            config=FP8_LLAMA,
            mesh="tp=2",
        ),
        "error quant-misaligned: rule 'mlp-row': key 'model.layers.0.mlp.down_proj.weight_scale_inv': tp=2 cu"
        "ts in (3 blocks of 128) inside a block (found 3 blocks of 128 along in, tp=2 -> 1.5 blocks on a rank"
        ", expected whole blocks on every rank). Fix: use tp = 1, 3 (sizes that divide its 3 blocks), or a ch"
        "eckpoint quantized with smaller blocks",
    ),
    (
        "quant-companion-shape",
        dict(
            text=None,
            ruleset="llama",
            keys=[(f"{DOWN}.weight", "F8_E4M3", [32, 512]), (f"{DOWN}.weight_scale_inv", "F32", [1, 5])],
            config=FP8_LLAMA,
            mesh="tp=1",
        ),
        dict(
            text=None,
            ruleset="llama",
            keys=[(f"{DOWN}.weight", "F8_E4M3", [32, 512]), (f"{DOWN}.weight_scale_inv", "F32", [1, 4])],
            config=FP8_LLAMA,
            mesh="tp=1",
        ),
        "error quant-companion-shape: key 'model.layers.0.mlp.down_proj.weight_scale_inv': shape [1, 5], wher"
        "e fp8-block gives [1, 4] for its 'weight' of [32, 512]. Fix: check the quantization_config (block, g"
        "roup and pack sizes) against the checkpoint",
    ),
    (
        "quant-orphan",
        dict(
            text=None,
            ruleset="llama",
            keys=[(f"{DOWN}.weight_scale_inv", "F32", [1, 4])],
            config=FP8_LLAMA,
            mesh="tp=1",
        ),
        dict(
            text=None,
            ruleset="llama",
            keys=[(f"{DOWN}.weight", "F8_E4M3", [32, 512]), (f"{DOWN}.weight_scale_inv", "F32", [1, 4])],
            config=FP8_LLAMA,
            mesh="tp=1",
        ),
        "error quant-orphan: key 'model.layers.0.mlp.down_proj.weight_scale_inv': 1 companion with no 'weight"
        "' beside it (fp8-block). Fix: check the checkpoint: a fp8-block layer stores its values in 'weight'",
    ),
    (
        "quant-companion-rule",
        dict(
            text=SCALES_FIRST,
            keys=[("m.q_proj.weight", "F8_E4M3", [256, 128]), ("m.q_proj.weight_scale_inv", "F32", [2, 1])],
            config=FP8,
            mesh="tp=2",
        ),
        dict(
            text=SCALES_FIRST.replace('match = "**.weight_scale_inv"', 'match = "**.other_scale"'),
            keys=[("m.q_proj.weight", "F8_E4M3", [256, 128]), ("m.q_proj.weight_scale_inv", "F32", [2, 1])],
            config=FP8,
            mesh="tp=2",
        ),
        "error quant-companion-rule: rule 'scales': key 'm.q_proj.weight_scale_inv': decided by rule 'scales'"
        ", but its weight by 'q'. Fix: let the rule for the weight decide its companions: narrow 'scales' so "
        "it does not match them",
    ),
    (
        "mesh-axis",
        dict(text=HEAD + EXPERT, mesh="EP=2"),
        dict(text=HEAD + EXPERT, mesh="ep=2"),
        "error mesh-axis: the mesh EP=2 has an axis 'EP' that ruleset 't' does not place (found 'EP', expecte"
        "d one of the ruleset's axes (ep, tp) or a replication axis (dp, pcp, dcp, cp)). Fix: correct the axi"
        "s (did you mean 'ep'?), or use a ruleset that places it (`ownership rules list` shows their axes)",
    ),
    (
        "silent-replication",
        dict(text=HEAD + EXPERT, keys=[*KEYS, FUSED_KEY]),
        dict(text=HEAD + EXPERT + FUSED_RULE, keys=[*KEYS, FUSED_KEY]),
        "error silent-replication: rule '<default>': key 'm.layers.0.mlp.experts.gate_up_proj': 1 tensor kept"
        " whole on every ep rank, though it carries the expert index (each rank would load every expert's wei"
        "ghts). Fix: add a rule that places them over ep: <expert> in the pattern for per-expert keys, or a l"
        'ayout naming `expert` for fused tensors; or replicate = ["ep"] on a rule that means to keep them who'
        "le",
    ),
    (
        "empty-coordinate",
        dict(text=HEAD + EXPERT, mesh="ep=8"),
        dict(text=HEAD + EXPERT, mesh="ep=4"),
        "warning empty-coordinate: rule 'expert': ep coordinates 4, 5, 6, 7 hold no expert (linear split of 4"
        " experts over ep=8). Fix: use an ep size of at most 4 (a divisor of it balances best)",
    ),
    (
        "expert-count",
        dict(text=HEAD + EXPERT, num_experts=8),
        dict(text=HEAD + EXPERT, num_experts=4),
        "warning expert-count: rule 'expert': the checkpoint's expert keys stop at expert 3, but num_experts="
        "8: experts 4..7 have no keys. Fix: check num_experts against the checkpoint's config (an adapter's c"
        "omes from its base model: --config), or pass --param num_experts=N",
    ),
    (
        "byte-imbalance",
        dict(text=HEAD + EXPERT, keys=SHAPED_KEYS, mesh="ep=3"),
        dict(text=HEAD + EXPERT, keys=SHAPED_KEYS, mesh="ep=2"),
        "warning byte-imbalance: rule 'expert': key 'm.layers.0.mlp.experts.0.w1.weight': rank 0 holds 512 B,"
        " 1.50x the mean of 341 B; most of the excess comes from rule 'expert' (+171 B). Fix: spread what tho"
        "se rules place more evenly: an axis size that divides the experts or layers, explicit pp_stage_sizes"
        ", or a table of experts per rank",
    ),
    (
        "layout-ambiguous",
        dict(text=HEAD + ORIENTATIONS, keys=[FUSED_KEY], mesh="tp=2"),
        dict(
            text=HEAD + ORIENTATIONS.replace("layout =", "sizes = { hidden = 8 }\nlayout ="),
            keys=[FUSED_KEY],
            mesh="tp=2",
        ),
        "error layout-ambiguous: rule 'fused': key 'm.layers.0.mlp.experts.gate_up_proj': the tensor fits sev"
        "eral of the rule's layouts, which cut it differently: 'expert hidden inter', 'expert inter hidden' ("
        "found shape [4, 8, 6], expected one layout that the shape and the model's sizes fit). Fix: give the "
        "rule the model's size of hidden or inter (in `sizes` or the ruleset's [dims], from a param the model"
        "'s config.json has) so the shape tells the orientations apart",
    ),
]


@pytest.mark.parametrize(("check", "bad", "good", "expected"), CASES, ids=[c[0] for c in CASES])
def test_check_fires_and_its_fixed_twin_is_quiet(check: str, bad: dict, good: dict, expected: str) -> None:  # type: ignore[type-arg]
    found = checks(**bad)
    assert found.get(check) == expected
    assert check not in checks(**good)


def test_every_check_has_a_case() -> None:
    # Static compiler problems have their own tests in test_rule_errors.py; the rest are here.
    static = {
        "pattern-error",
        "layout-error",
        "unknown-axis",
        "unknown-param",
        "unknown-strategy",
        "bad-strategy",
        "missing-size",
        "placed-not-captured",
        "placed-text-capture",
        "axis-placed-twice",
        "unknown-index",
        "bad-rename",
        "bad-pin",
        "bad-table",
        "bad-param",
        "bad-capture",
        "variant-absent",
        "byte-balance",
    }
    assert set(CHECKS) - static <= {case[0] for case in CASES}


def test_variant_absent_and_byte_balance_are_notes(fixtures: Path) -> None:
    report = lint(
        "vllm-ep-lora", fixtures / "qwen3_moe/lora_per_expert", mesh="ep=4", params={"num_experts": 6}
    )
    assert report.exit_code == 0
    notes = {f.check: f.text() for f in report.findings}
    assert notes["variant-absent"] == (
        "info variant-absent: no key uses layout variant 'fused' (rules fused-expert-lora-a, fused-expert-lora-b); "
        "this checkpoint uses per-expert"
    )
    assert notes["byte-balance"].startswith(
        "info byte-balance: bytes per rank: max 18.7 KiB on rank 0, mean 16.1 KiB"
    )


CHECKPOINTS = ["lora_per_expert", "lora_per_expert_bin", "lora_fused", "lora_fused_bin", "base", "base_bin"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_builtin_lints_clean_on_its_fixtures(name: str) -> None:
    for family in ("qwen3_moe", "mixtral"):
        path = FIXTURES / family / name
        if not path.exists():
            continue
        for ep in range(1, 9):
            for strategy in ("linear", "round_robin"):
                report = lint(
                    "vllm-ep-lora",
                    path,
                    mesh=f"ep={ep}",
                    params={"num_experts": 6, "expert_strategy": strategy},
                )
                assert report.exit_code == 0, (path, ep, to_text(report))
                # 6 experts: ep ranks past the sixth hold none, and an ep size that does not divide 6 leaves some
                # ranks with one expert more than others; both are warnings, and nothing else is.
                warnings = {f.check for f in report.findings if f.level == "warning"}
                assert ("empty-coordinate" in warnings) == (ep > 6), to_text(report)
                assert warnings - {"empty-coordinate"} <= ({"byte-imbalance"} if 6 % ep else set()), to_text(
                    report
                )


BASE = builtin_path("vllm-ep-lora").read_text()
PLANTED = {
    "dead-rule": (
        BASE.replace(r"experts\.)(?P<expert>", r"expertz\.)(?P<expert>"),
        "lora_per_expert",
        "ep=4",
        {},
    ),
    "shadowed-rule": (
        BASE.replace(
            '[[rule]]\nid = "fused-expert-lora-a"',
            '[[rule]]\nid = "all-fused"\nmatch = "**.experts.**"\n\n[[rule]]\nid = "fused-expert-lora-a"',
        ),
        "lora_fused",
        "ep=4",
        {},
    ),
    "unmatched-key": (
        BASE.replace('default = "replicate"', 'default = "error"'),
        "lora_per_expert",
        "ep=4",
        {},
    ),
    "lora-pair": (
        BASE.split('id = "fused-expert-lora-b"')[0]
        + 'id = "fused-expert-lora-b"'
        + BASE.split('id = "fused-expert-lora-b"')[1].replace(
            'strategy = "expert_strategy"', 'strategy = "round_robin"'
        ),
        "lora_fused",
        "ep=4",
        {},
    ),
    "index-out-of-range": (BASE, "lora_per_expert", "ep=4", {"num_experts": 4}),
    "shard-does-not-divide": (
        BASE + '\n[[rule]]\nid = "q-cols"\nmatch = "**.q_proj.lora_B.weight"\nlayout = "out r"\n'
        'place = { out = { over = "ep", strategy = "shard" } }\n',
        "lora_per_expert",
        "ep=3",
        {},
    ),
}


@pytest.mark.parametrize("check", list(PLANTED))
def test_planted_defects_in_vllm_ep_lora_are_found(
    tmp_path: Path, check: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text, checkpoint, mesh, params = PLANTED[check]
    assert text != BASE or params, "the defect was not planted"
    rules = tmp_path / "planted.toml"
    rules.write_text(text)
    argv = [
        "lint",
        str(rules),
        str(FIXTURES / "qwen3_moe" / checkpoint),
        "--mesh",
        mesh,
        "--format",
        "json",
        "--param",
        f"num_experts={params.get('num_experts', 6)}",
    ]
    assert main(argv) == 1
    found = {f["check"] for f in json.loads(capsys.readouterr().out)["findings"] if f["level"] == "error"}
    assert check in found


def test_sarif_points_at_the_rule_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text(HEAD + EXPERT + '[[rule]]\nid = "router"\nmatch = "**.mlp.gate.lora_A.weight"\n')
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(KEYS))
    assert main(["lint", str(rules), "--keys", str(keys), "--mesh", "ep=2", "--format", "sarif"]) == 1
    sarif = json.loads(capsys.readouterr().out)
    assert sarif["version"] == "2.1.0"
    result = next(r for r in sarif["runs"][0]["results"] if r["ruleId"] == "dead-rule")
    assert result["level"] == "error"
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == rules.as_uri()  # outside the working folder
    assert location["region"]["startLine"] == 11
    assert "dead-rule" in {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]}


def test_sarif_of_a_builtin_points_at_its_file(capsys: pytest.CaptureFixture[str]) -> None:
    """before: the built-in's label, `vllm-ep-lora.toml (built-in)`, which is no path."""
    keys = [k.replace("experts.1.", "experts.9.") for k in KEYS]
    report = lint("vllm-ep-lora", keys, mesh="ep=2", params={"num_experts": 4})
    location = to_sarif(report)["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "rules/vllm-ep-lora.toml"


def test_exit_status_two_on_unusable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lint", "vllm-ep-lora", str(tmp_path / "missing"), "--mesh", "ep=2"]) == 2
    assert "no such checkpoint: found no file or folder there" in capsys.readouterr().err
    assert main(["lint", "vllm-ep-lora", "--mesh", "ep=two"]) == 2


def test_static_lint_without_keys_is_clean_for_builtins() -> None:
    report = lint("vllm-ep-lora", mesh="ep=8", params={"num_experts": 64})
    assert report.findings == [] and to_json(report)["clean"]
    assert to_sarif(report)["runs"][0]["results"] == []
