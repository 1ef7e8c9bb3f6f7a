"""The built-in rulesets on the key lists of real published releases (tests/fixtures/real: each release's
`config.json` and `model.safetensors.index.json` as its publisher released them, with dtypes and shapes derived
from the config and proven by the index's `total_size`, tests/e2e/test_real_shapes.py).

For each release, at its meshes (ep=8 and pp=2,ep=4,tp=2 for MoE releases; tp=8 and pp=2,tp=4 for dense ones):
the ruleset its config picks (`auto`) decides every key, lint finds nothing above a note, the largest rank
holds at most 1.05x the mean (its ideal share), and every expert is owned by the ep rank vLLM's
`determine_expert_map` gives it (linear: the first `E % P` ranks hold one more).
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest

from ownership import load_ruleset
from ownership.lint import lint
from ownership.lint.output import to_text
from ownership.loading.entries import KeyEntry
from ownership.placement.mesh import Mesh
from ownership.placement.selection import dim_indices
from ownership.ruleset import resolve_ruleset
from tests.fixtures.real import shapes

MOE = ["ep=8", "pp=2,ep=4,tp=2"]
DENSE = ["tp=8", "pp=2,tp=4"]

# release -> (ruleset, meshes, params by mesh). Params only where a deployment would set them, with the reason.
RELEASES: dict[str, tuple[str, list[str], dict[str, dict[str, Any]]]] = {
    "openai--gpt-oss-20b": ("auto", MOE, {}),
    "openai--gpt-oss-20b/original": ("gpt-oss", MOE, {}),
    "openai--gpt-oss-120b/original": ("gpt-oss", MOE, {}),
    "mistralai--Mixtral-8x7B-Instruct-v0.1": ("auto", MOE, {}),
    "MiniMaxAI--MiniMax-M1-40k": ("auto", MOE, {}),
    "ibm-granite--granite-3.1-1b-a400m-instruct": ("auto", MOE, {}),
    # The vision tower runs on the first stage: 22 + 26 layers (VLLM_PP_LAYER_PARTITION) even the stages out;
    # vLLM's default 24 + 24 leaves stage 0 at 1.055x the mean.
    "Qwen--Qwen3-VL-30B-A3B-Thinking": ("auto", MOE, {"pp=2,ep=4,tp=2": {"pp_stage_sizes": [22, 26]}}),
    # 10 attention heads: tp must divide 10. At pp=2 the encoders (SAM, CLIP-L / Qwen2) make stage 0 heavier,
    # which lint warns about (test_a_heavy_first_stage_is_a_warning).
    "deepseek-ai--DeepSeek-OCR": ("auto", ["ep=8", "ep=4,tp=2"], {}),
    "deepseek-ai--DeepSeek-OCR-2": ("auto", ["ep=8", "ep=4,tp=2"], {}),
    "meta-llama--Llama-3.2-3B-Instruct": ("auto", DENSE, {}),
    "mattshumer--Reflection-Llama-3.1-70B": ("auto", DENSE, {}),
    "Qwen--Qwen2.5-Coder-32B-Instruct": ("auto", DENSE, {}),
    "mistralai--Devstral-Small-2507": ("auto", DENSE, {}),
    "XiaomiMiMo--MiMo-7B": ("auto", DENSE, {}),
    "google--medgemma-27b-it": ("auto", DENSE, {}),
}
# Not served by vLLM 0.33 (QWenLMHeadModel was removed in 0.23.0), so no built-in ruleset claims it.
UNSERVED = {"Qwen--Qwen-72B"}

FOLDERS = {shapes.release_name(folder): folder for folder in shapes.releases()}
CASES = [(name, mesh) for name, (_, meshes, _) in RELEASES.items() for mesh in meshes]


def test_every_release_is_covered() -> None:
    assert set(FOLDERS) == set(RELEASES) | UNSERVED


@cache
def entries(name: str) -> list[KeyEntry]:
    return [KeyEntry(key, dtype, shape) for key, dtype, shape in shapes.key_list(FOLDERS[name])]


def config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FOLDERS[name] / "config.json").read_text())
    return data


@pytest.mark.parametrize(("name", "mesh"), CASES, ids=[f"{n}@{m}" for n, m in CASES])
def test_lints_clean_and_balanced(name: str, mesh: str) -> None:
    ruleset, _, params = RELEASES[name]
    report = lint(ruleset, entries(name), mesh=mesh, config=config(name), params=params.get(mesh, {}))
    assert [f.text() for f in report.findings if f.level != "info"] == [], to_text(report)
    balance = next(f for f in report.findings if f.check == "byte-balance")
    assert balance.data["max_over_mean"] <= 1.05, balance.message


EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


def vllm_expert_map(num_experts: int, ep: int, rank: int) -> range:
    """vLLM's determine_expert_map, linear: rank r holds E // P ids, and one more when r < E % P."""
    base, extra = divmod(num_experts, ep)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


MOE_CASES = [(n, m) for n, m in CASES if "ep=" in m]


@pytest.mark.parametrize(("name", "mesh"), MOE_CASES, ids=[f"{n}@{m}" for n, m in MOE_CASES])
def test_experts_are_where_vllm_puts_them(name: str, mesh: str) -> None:
    ruleset_name, _, params = RELEASES[name]
    ruleset = resolve_ruleset(ruleset_name, config(name))
    bound = ruleset.bind(mesh=mesh, config=config(name), params=params.get(mesh, {}))
    num_experts = bound.params["num_experts"]
    layout = Mesh.parse(mesh)
    ep = layout.size("ep")
    checked = 0
    for entry in entries(name):
        per_expert = EXPERT_KEY.search(entry.key)
        # Fused: every tensor led by the expert count but the routers ([E, H] gate weights, [E] biases).
        shape = entry.shape or ()
        fused = len(shape) >= 3 or (len(shape) == 2 and (".experts." in entry.key or ".mlp.mlp" in entry.key))
        if per_expert is None and not (fused and shape[0] == num_experts):
            continue
        for rank, decision in bound.owners(entry.key, entry.shape):
            coord = layout.coords(rank)["ep"]
            held = set(vllm_expert_map(num_experts, ep, coord))
            if per_expert is not None:
                assert int(per_expert.group(1)) in held, (entry.key, rank)
            else:
                assert entry.shape is not None
                selection = decision.selection
                rows = set(dim_indices(None if selection is None else selection[0], entry.shape[0]))
                assert rows == held, (entry.key, rank)
            checked += 1
    assert checked > 0


def test_a_heavy_first_stage_is_a_warning() -> None:
    """DeepSeek-OCR-2's encoders (SAM and a Qwen2-0.5B encoder, whole on the first stage) outweigh its 3B language
    model's share: at pp=2 the first stage's ranks hold 1.43x the mean, and lint says which rules put it there."""
    name = "deepseek-ai--DeepSeek-OCR-2"
    report = lint("auto", entries(name), mesh="pp=2,ep=4,tp=2", config=config(name))
    [warning] = [f for f in report.findings if f.level != "info"]
    assert warning.check == "byte-imbalance"
    assert warning.data["rules"][0] == "encoders-replicated"
    assert 1.4 < warning.data["max_over_mean"] < 1.45


def test_an_unserved_family_is_named() -> None:
    name = "Qwen--Qwen-72B"
    with pytest.raises(Exception) as info:
        lint("auto", entries(name), mesh="tp=8", config=config(name))
    assert "found model_type 'qwen'" in str(info.value)


def test_every_family_ruleset_is_exercised() -> None:
    """Each built-in family ruleset with a real release here decides its keys (no rule of the release's ruleset
    other than optional ones goes unused is checked by lint itself); this pins which ones are proven on real
    data."""
    used = {
        resolve_ruleset(r if r != "auto" else "auto", config(n)).name for n, (r, _, _) in RELEASES.items()
    }
    assert used == {"gpt-oss", "transformers-moe", "qwen3-vl-moe", "deepseek-ocr", "llama", "mimo", "gemma3"}
    assert all(load_ruleset(name) for name in used)
