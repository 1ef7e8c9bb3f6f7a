"""Ruleset composition (extends, overrides, [place], when, optional) and finding a ruleset by model_type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownership import RulesetError, load_ruleset
from ownership.cli import main
from ownership.formats import open_checkpoint
from ownership.lint import lint
from ownership.loading.plan import Plan
from ownership.ruleset import Ruleset, detect_ruleset
from ownership.spec.builtin import builtin_names, families
from tests.conftest import FIXTURES

BASE = """
name = "base"
axes = ["tp"]
[params.num_heads]
default = 4
[place]
heads = { over = "tp", strategy = "shard", size = "num_heads" }
[[rule]]
id = "q"
match = "**.q_proj.weight"
layout = "(heads head_dim) in"
[[rule]]
id = "rest"
match = "**"
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def error_of(path: Path) -> RulesetError:
    with pytest.raises(RulesetError) as info:
        Ruleset.from_file(path)
    return info.value


def test_child_rules_come_first_and_overrides_keep_the_place(tmp_path: Path) -> None:
    write(tmp_path, "base.toml", BASE)
    child = write(
        tmp_path,
        "child.toml",
        """
name = "child"
extends = "base.toml"
axes = ["ep"]
[[rule]]
id = "sinks"
match = "**.sinks"
layout = "heads"
[[rule]]
id = "qkv"
overrides = "q"
match = "**.qkv.weight"
""",
    )
    ruleset = Ruleset.from_file(child)
    assert [r.id for r in ruleset.program.rules] == ["sinks", "qkv", "rest"]
    assert ruleset.spec.axes == ["tp", "ep"]
    assert tuple(map(str, ruleset.extends)) == (str(tmp_path / "base.toml"),)
    # [place.heads] of the parent reaches the child's rule that lays out `heads`.
    owners = ruleset.bind(mesh="tp=2").owners("a.sinks", (4,))
    assert [(rank, d.selection) for rank, d in owners] == [(0, (((0, 2, 1),),)), (1, (((2, 4, 1),),))]


def test_composition_errors_name_both_rulesets_and_the_fix(tmp_path: Path) -> None:
    write(tmp_path, "base.toml", BASE)
    reused = write(tmp_path, "a.toml", 'name = "a"\nextends = "base.toml"\n[[rule]]\nid = "q"\nmatch = "x"\n')
    assert str(error_of(reused)) == (
        f"{reused}: rule 'q': rule id 'q' is already a rule of the extended ruleset 'base': expected a new id, "
        'or `overrides` to replace the inherited rule. Fix: add overrides = "q" to replace it in place, or give '
        "this rule another id"
    )
    missing = write(
        tmp_path,
        "b.toml",
        'name = "b"\nextends = "base.toml"\n[[rule]]\nid = "k"\noverrides = "kk"\nmatch = "x"\n',
    )
    error = error_of(missing)
    assert error.code == "bad-override"
    assert "rule overrides 'kk', which 'base' does not have" in str(error)
    assert "['q', 'rest']" in str(error)
    write(tmp_path, "c.toml", 'name = "c"\nextends = "d.toml"\n')
    cycle = write(tmp_path, "d.toml", 'name = "d"\nextends = "c.toml"\n')
    error = error_of(cycle)
    assert error.code == "extends-cycle"
    assert "d -> c -> d" in str(error)
    unknown = write(tmp_path, "e.toml", 'name = "e"\nextends = "no-such-ruleset"\n')
    assert error_of(unknown).code == "unknown-ruleset"


def test_when_picks_one_of_two_rules_and_lint_does_not_call_the_other_shadowed() -> None:
    llama = load_ruleset("llama")
    params = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
    untied = llama.bind(mesh="pp=2", params=params).owners("model.embed_tokens.weight", (128, 32))
    tied = llama.bind(mesh="pp=2", params={**params, "tie_word_embeddings": True}).owners(
        "model.embed_tokens.weight", (128, 32)
    )
    assert [(r, d.rule) for r, d in untied] == [(0, "embed")]
    assert [(r, d.rule) for r, d in tied] == [(0, "embed-tied"), (1, "embed-tied")]
    report = lint("llama", None, mesh="pp=2", params=params)
    assert [f.check for f in report.findings] == []


def test_optional_rules_are_neither_dead_nor_shadowed_but_others_are() -> None:
    text = """
name = "t"
axes = []
[[rule]]
id = "all"
match = "**"
[[rule]]
id = "fallback"
optional = true
match = "**.weight"
[[rule]]
id = "strict"
match = "**.bias"
"""
    report = lint("t.toml", ["a.weight", "a.bias"], mesh="dp=1", text=text)
    assert sorted((f.check, f.rule) for f in report.findings if f.level == "error") == [
        ("shadowed-rule", "strict")
    ]


def test_every_family_finds_its_builtin_ruleset() -> None:
    assert families()["qwen3_moe"] == "transformers-moe"
    assert families()["gpt_oss"] == "gpt-oss"
    assert families()["llama4_text"] == "llama4"
    assert families()["dbrx"] == "dbrx"
    assert families()["llama"] == "llama"
    for model_type, name in families().items():
        assert name in builtin_names()
        assert load_ruleset(model_type).name == name
    assert detect_ruleset({"model_type": "mixtral"}).name == "transformers-moe"
    with pytest.raises(RulesetError) as info:
        detect_ruleset({"model_type": "bert"}, source="ckpt")
    assert str(info.value) == (
        "ckpt: cannot pick a ruleset for this checkpoint: found model_type 'bert', expected a model_type that a "
        "built-in ruleset lists (`ownership rules list`). Fix: name a ruleset (a built-in or a .toml file), or "
        "pass --config with the base model's config.json"
    )


def test_an_adapter_reads_its_local_base_models_config(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    source = FIXTURES / "qwen3_moe" / "lora_fused"
    for name in ("adapter_model.safetensors",):
        (adapter / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(FIXTURES / "qwen3_moe" / "base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with open_checkpoint(adapter) as checkpoint:
        assert checkpoint.config is not None
        assert checkpoint.config["model_type"] == "qwen3_moe"
        assert checkpoint.config["num_local_experts"] == 6
        assert checkpoint.config["r"] == 4  # the adapter's own fields stay


def test_cli_picks_the_ruleset_from_the_checkpoint_and_params_from_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = FIXTURES / "qwen3_moe" / "base"
    adapter = FIXTURES / "qwen3_moe" / "lora_fused"
    assert main(["plan", str(base), "--mesh", "ep=2,tp=2", "--rank", "3", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["ruleset"] == "transformers-moe" and plan["params"]["num_experts"] == 6
    config = str(base / "config.json")
    assert main(["lint", str(adapter), "--mesh", "pp=2,ep=3,tp=4", "--config", config]) == 0
    assert "clean: 0 errors, 0 warnings" in capsys.readouterr().out
    # Without the base's config the adapter's params are missing, and the message says where to get them.
    assert main(["plan", "transformers-moe", str(adapter), "--mesh", "ep=2", "--rank", "0"]) == 2
    assert "missing param" in capsys.readouterr().err


def test_rules_list_shows_families_axes_and_what_each_extends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "list", "--format", "json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["gpt-oss"]["extends"] == ["transformers-moe", "llama"]
    assert rows["transformers-moe"]["axes"] == ["pp", "tp", "ep"]
    assert "deepseek_v3" in rows["transformers-moe"]["families"]
    assert main(["rules", "show", "gpt_oss"]) == 0
    out = capsys.readouterr().out
    assert "# extends transformers-moe.toml (built-in) < llama.toml (built-in)" in out
    assert "gpt-oss-gate-up              overrides 'fused-gate-up'" in out


def test_no_model_type_is_served_by_two_builtin_rulesets() -> None:
    seen: dict[str, str] = {}
    for name in builtin_names():
        for family in load_ruleset(name).spec.families:
            assert family not in seen, f"{family!r} is listed by {seen.get(family)} and {name}"
            seen[family] = name
    assert seen == families()


def test_python_api_takes_an_adapters_base_config() -> None:
    from ownership.loading.loader import load

    adapter = FIXTURES / "qwen3_moe" / "lora_fused"
    config = json.loads((FIXTURES / "qwen3_moe" / "base" / "config.json").read_text())
    ruleset = load_ruleset("qwen3_moe")
    plan = ruleset.plan(adapter, mesh="ep=2,tp=2", rank=3, config=config)
    result = load(ruleset, adapter, mesh="ep=2,tp=2", rank=3, config=config)
    assert isinstance(plan, Plan) and plan.params["num_experts"] == 6
    assert [d.key for d in result.plan.owned] == [d.key for d in plan.owned]
    report = lint("transformers-moe", adapter, mesh="ep=2,tp=2", config=config)
    assert report.exit_code == 0
    with pytest.raises(RulesetError, match="missing param"):
        ruleset.plan(adapter, mesh="ep=2", rank=0)
