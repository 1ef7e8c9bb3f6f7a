"""What went wrong, silently, on the key lists of real releases and on common mistakes, each pinned: every test's
docstring says what happened before (ownership 0.2.0 as it stood, measured on the same inputs).

The key lists are those of tests/fixtures/real (the publishers' config.json and index, shapes derived from the
config and proven by the index's total_size).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from ownership import CheckpointError, load_ruleset
from ownership.cli import main
from ownership.lint import lint
from ownership.loading.entries import KeyEntry
from ownership.loading.plan import MeshPlan, plan
from ownership.ruleset import detect_ruleset
from tests.conftest import FIXTURES
from tests.fixtures.real import shapes

REAL = {shapes.release_name(folder): folder for folder in shapes.releases()}


@cache
def entries(name: str) -> list[KeyEntry]:
    return [KeyEntry(key, dtype, shape) for key, dtype, shape in shapes.key_list(REAL[name])]


def config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REAL[name] / "config.json").read_text())
    return data


def problems(report: Any) -> dict[str, Any]:
    """check -> its first finding above a note."""
    found: dict[str, Any] = {}
    for finding in report.findings:
        if finding.level != "info":
            found.setdefault(finding.check, finding)
    return found


def max_rank_bytes(result: Any) -> int:
    assert isinstance(result, MeshPlan)
    return max(rank.bytes_owned for rank in result.ranks)


# GPT-OSS


def test_gpt_oss_experts_are_split_over_ep() -> None:
    """before: at ep=8 the MXFP4 expert tensors (`*_blocks`, `*_scales`) matched no expert rule and fell to the
    catch-all: every rank held 13.75 GB of the 13.76 GB, and lint said clean."""
    name = "openai--gpt-oss-20b"
    result = plan("auto", entries(name), mesh="ep=8", config=config(name))
    assert 4.0e9 < max_rank_bytes(result) < 5.0e9
    assert problems(lint("auto", entries(name), mesh="ep=8", config=config(name))) == {}


def test_a_catch_all_that_keeps_experts_whole_is_an_error() -> None:
    """before: the wrong family's ruleset (transformers-moe on a gpt_oss checkpoint) replicated every expert on
    every ep rank, with no finding at all."""
    name = "openai--gpt-oss-20b"
    found = problems(lint("transformers-moe", entries(name), mesh="ep=8", config=config(name)))
    assert set(found) == {"silent-replication", "wrong-ruleset"}
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in found["silent-replication"].keys
    assert (
        found["silent-replication"].data["num_keys"] == 24 * 6
    )  # blocks, scales and bias of both projections
    assert found["wrong-ruleset"].data["ruleset"] == "gpt-oss"


def test_openais_original_names_are_decided() -> None:
    """before: none of the 363 keys of OpenAI's original/ folder matched a rule."""
    name = "openai--gpt-oss-20b/original"
    report = lint("gpt-oss", entries(name), mesh="pp=2,ep=4,tp=2", config=config(name))
    assert problems(report) == {}
    hf = plan("auto", entries("openai--gpt-oss-20b"), mesh="ep=8", config=config("openai--gpt-oss-20b"))
    original = plan("gpt-oss", entries(name), mesh="ep=8", config=config(name))
    assert max_rank_bytes(original) == max_rank_bytes(hf)  # one model, two namings, one share


# Qwen3-VL-MoE


def test_a_transposed_expert_tensor_is_an_error_not_a_cut_on_the_wrong_dim() -> None:
    """before: transformers-moe took Qwen3-VL's [E, H, 2I] experts for [E, 2I, H]; the sizes happened to divide,
    so at tp=2 it cut the hidden dim in two and lint said clean."""
    name = "Qwen--Qwen3-VL-30B-A3B-Thinking"
    text_model = [e for e in entries(name) if not e.key.startswith("model.visual.")]
    report = lint("transformers-moe", text_model, mesh="tp=2", config=config(name))
    mismatches = {f.rule: f.message for f in report.findings if f.check == "layout-mismatch"}
    assert "found shape [128, 2048, 1536]: size 2048 at dim 1" in mismatches["fused-gate-up"]
    assert "expected half=2 * inter=768 at dim 1 (inter = expert_inter = 768)" in mismatches["fused-gate-up"]
    assert "found shape [128, 768, 2048]: size 768 at dim 1" in mismatches["fused-down"]


def test_qwen3_vl_reads_text_config_and_places_its_vision_tower() -> None:
    """before: `num_layers` was "missing" (the params live under text_config) and the vision tower's keys matched
    no rule."""
    name = "Qwen--Qwen3-VL-30B-A3B-Thinking"
    ruleset = detect_ruleset(config(name))
    assert ruleset.name == "qwen3-vl-moe"
    params = ruleset.resolve_params(config=config(name))
    assert (params["num_layers"], params["num_experts"], params["vision_heads"]) == (48, 128, 16)
    bound = ruleset.bind(mesh="pp=2,tp=2", config=config(name))
    vision = [e for e in entries(name) if e.key.startswith("model.visual.")]
    assert len(vision) == 351
    assert all(
        {rank for rank, _ in bound.owners(e.key, e.shape)} <= {0, 1} for e in vision
    )  # the first stage


# MTP layers


def deepseek_v3_keys(num_layers: int) -> list[str]:
    """DeepSeek-V3's key names (as its published index has them) for a few layers and its MTP layer, which is
    stored as layer `num_hidden_layers`."""
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in (0, num_layers - 1, num_layers):
        base = f"model.layers.{layer}"
        keys += [
            f"{base}.input_layernorm.weight",
            f"{base}.self_attn.q_a_proj.weight",
            f"{base}.self_attn.q_b_proj.weight",
            f"{base}.self_attn.kv_a_proj_with_mqa.weight",
            f"{base}.self_attn.kv_b_proj.weight",
            f"{base}.self_attn.o_proj.weight",
            f"{base}.mlp.gate.weight",
            *(
                f"{base}.mlp.experts.{e}.{p}.weight"
                for e in range(8)
                for p in ("gate_proj", "up_proj", "down_proj")
            ),
        ]
    mtp = f"model.layers.{num_layers}"
    keys += [f"{mtp}.{name}.weight" for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm")]
    keys += [f"{mtp}.shared_head.head.weight", f"{mtp}.embed_tokens.weight"]
    return keys


DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "n_routed_experts": 8,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
}


def test_deepseek_v3s_mtp_layer_is_on_the_last_stage() -> None:
    """before: the multi-token-prediction layer `model.layers.61.*` was out of range (num_layers = 61), which
    blocked plan and lint for the whole family, even at plain ep=8."""
    keys = deepseek_v3_keys(61)
    assert problems(lint("auto", keys, mesh="ep=8", config=DEEPSEEK_V3)) == {}
    bound = load_ruleset("transformers-moe").bind(mesh="pp=4,ep=2", config=DEEPSEEK_V3)
    for key in keys:
        if key.startswith("model.layers.61."):
            assert {rank for rank, _ in bound.owners(key)} <= {6, 7}, key  # pp coordinate 3


def test_mimos_mtp_layers_are_decided() -> None:
    """before: MiMo's `model.mtp_layers.0.*` (16 keys) matched no rule."""
    name = "XiaomiMiMo--MiMo-7B"
    assert problems(lint("auto", entries(name), mesh="pp=2,tp=4", config=config(name))) == {}
    bound = detect_ruleset(config(name)).bind(mesh="pp=2,tp=4", config=config(name))
    mtp = [e for e in entries(name) if ".mtp_layers." in e.key]
    assert len(mtp) == 16
    assert all({rank for rank, _ in bound.owners(e.key, e.shape)} == {4, 5, 6, 7} for e in mtp)


# Nested layers and stray norms


def test_an_encoders_layers_are_not_decoder_layers() -> None:
    """before: `**.layers.<layer>.**` took DeepSeek-OCR-2's Qwen2 encoder (`model.qwen2_model.model.model.layers.N`)
    for decoder layers, and `**.norm.weight` its encoder's norm for the final norm."""
    name = "deepseek-ai--DeepSeek-OCR-2"
    report = lint("transformers-moe", entries(name), mesh="pp=2", config=config(name))
    unmatched = problems(report)["unmatched-key"]
    assert unmatched.data["num_keys"] > 0
    ruleset = detect_ruleset(config(name))
    bound = ruleset.bind(mesh="pp=2", config=config(name))
    assert (
        bound.rule_id("model.qwen2_model.model.model.layers.23.self_attn.q_proj.weight")
        == "encoders-replicated"
    )
    assert bound.rule_id("model.qwen2_model.model.model.norm.weight") == "encoders-replicated"
    assert bound.rule_id("model.norm.weight") == "final-norm"


# Vocab padding


@pytest.mark.parametrize(
    ("name", "mesh", "rows"),
    [
        ("ibm-granite--granite-3.1-1b-a400m-instruct", "tp=8", (6152, 6091)),
        ("mattshumer--Reflection-Llama-3.1-70B", "tp=8", (16040, 15982)),
    ],
)
def test_a_vocab_that_does_not_divide_is_padded_as_vllm_pads_it(
    name: str, mesh: str, rows: tuple[int, int]
) -> None:
    """before: a vocab not divisible by tp (granite-3.1's 49155, Reflection-70B's 128262) was an error; vLLM pads
    it to a multiple of 64 and loads."""
    result = plan("auto", entries(name), mesh=mesh, config=config(name))
    assert isinstance(result, MeshPlan)
    last = result.ranks[-1]
    embed = [p for p in last.padding if p.key == "model.embed_tokens.weight"]
    assert [(p.padded_rows, p.rows) for p in embed] == [rows]
    assert problems(lint("auto", entries(name), mesh=mesh, config=config(name))) == {}


# Detection and names-only key lists


def test_auto_picks_a_ruleset_for_every_served_release() -> None:
    """before: auto-detection found a ruleset for 8 of 16 real configs. Qwen-72B (model_type qwen) is no longer
    served by vLLM (removed in 0.23), so no built-in claims it."""
    own_format = {name for name in REAL if name.endswith("/original")}  # OpenAI's, no model_type: named
    served = {name: detect_ruleset(config(name)).name for name in set(REAL) - own_format - {"Qwen--Qwen-72B"}}
    assert len(served) == len(REAL) - len(own_format) - 1 == 13
    with pytest.raises(Exception, match="found model_type 'qwen'"):
        detect_ruleset(config("Qwen--Qwen-72B"))


def test_a_names_only_key_list_lints_where_no_cut_needs_a_shape() -> None:
    """before: a key list without shapes failed lint on every model, even where no rule cuts along an axis of the
    mesh; where one does, the error now names the key and the axis."""
    mixtral = [e.key for e in entries("mistralai--Mixtral-8x7B-Instruct-v0.1")]
    report = lint("auto", mixtral, mesh="pp=2,ep=8", config=config("mistralai--Mixtral-8x7B-Instruct-v0.1"))
    assert problems(report) == {}
    name = "Qwen--Qwen3-VL-30B-A3B-Thinking"
    found = problems(lint("auto", [e.key for e in entries(name)], mesh="ep=8", config=config(name)))
    assert found["shape-needed"].message.startswith("this rule cuts the tensor over ep and needs its shape")


# Mistakes that passed silently


@pytest.mark.parametrize(("mesh", "meant"), [("EP=4", "'ep'"), ("ep=2,pt=2", "'pp' or 'tp'")])
def test_a_misspelt_mesh_axis_is_an_error(mesh: str, meant: str) -> None:
    """before: `--mesh EP=4` split nothing (every rank loaded 100%) and `--mesh ep=2,pt=2` linted clean."""
    name = "mistralai--Mixtral-8x7B-Instruct-v0.1"
    found = problems(lint("auto", entries(name), mesh=mesh, config=config(name)))
    assert f"(did you mean {meant}?)" in found["mesh-axis"].fix


def test_a_config_of_another_family_is_an_error_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """before: a --config of another family silently overrode the checkpoint's own."""
    other = tmp_path / "config.json"
    other.write_text((FIXTURES / "mixtral" / "base" / "config.json").read_text())
    checkpoint = str(FIXTURES / "qwen3_moe" / "base")
    with pytest.raises(CheckpointError, match="the config given is of another model"):
        plan("auto", checkpoint, mesh="ep=2", config=json.loads(other.read_text()))
    assert main(["plan", checkpoint, "--mesh", "ep=2", "--all-ranks", "--config", str(other)]) == 2
    assert (
        "model_type 'mixtral' given, 'qwen3_moe' in the checkpoint's config.json" in capsys.readouterr().err
    )
    assert main(["lint", checkpoint, "--mesh", "ep=2", "--config", str(other), "--force-config"]) in (0, 1)


def test_naming_the_wrong_family_warns(capsys: pytest.CaptureFixture[str]) -> None:
    """before: `ownership plan transformers-moe` on a gpt_oss checkpoint said nothing, and cut its (in, out)
    experts as if they were (out, in); now it warns, and the model's sizes refuse the transposed tensors."""
    argv = ["plan", "transformers-moe", str(FIXTURES / "gpt_oss" / "base"), "--mesh", "ep=2", "--all-ranks"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "warning: ruleset 'transformers-moe' is not made for model_type 'gpt_oss'; the built-in for it is "
        in err
    )
    assert "rule 'fused-down'" in err and "(transposed?)" in err


def test_lint_warns_of_experts_and_stages_left_without_work() -> None:
    """before: lint was silent when num_experts exceeded the checkpoint's experts, when an ep rank got no expert
    (ep=8, 6 experts) and when a pipeline stage got no layer (pp=4, 3 layers)."""
    base = FIXTURES / "qwen3_moe" / "base"
    assert "expert-count" in problems(lint("auto", base, mesh="ep=2", params={"num_experts": 8}))
    empty = problems(lint("auto", base, mesh="ep=8"))["empty-coordinate"]
    assert empty.data["coordinates"] == [6, 7]
    stages = problems(lint("auto", base, mesh="pp=4", params={"num_layers": 3}))
    assert stages["empty-coordinate"].data["index"] == "layer"


def test_an_index_alone_plans_before_the_shards_are_downloaded(capsys: pytest.CaptureFixture[str]) -> None:
    """before: `--keys` took only a key-list file; a published model.safetensors.index.json (and the config.json
    beside it) could not be linted until its shards were downloaded."""
    index = REAL["mistralai--Mixtral-8x7B-Instruct-v0.1"] / "model.safetensors.index.json"
    assert main(["lint", "--keys", str(index), "--mesh", "pp=2,ep=8"]) == 0
    assert "transformers-moe (transformers-moe.toml (built-in)), mesh pp=2,ep=8, 995 keys: clean" in (
        capsys.readouterr().out
    )
