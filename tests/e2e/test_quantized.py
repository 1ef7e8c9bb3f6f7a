"""Quantized checkpoints, proven by reconstruction after dequantization: for every family of
tests/fixtures/data/quant and every mesh ep in {2, 4} x tp in {1, 2, 4} that lint finds legal, each rank's weight
and companions, as `ownership.load` reads them, dequantize (with the NumPy references of
tests/fixtures/quant/dequant.py) to exactly the slice vLLM gives that rank of the dequantized full weight, and the
ranks together give every element of every quantized weight back, bit for bit.

The slices are computed here, from vLLM's placement alone: column-parallel layers (q/k/v, gate/up, w1/w3,
q_b/kv_b) split their output rows into equal chunks (kv heads replicated when tp exceeds them), row-parallel
layers (o, down, w2) their input columns, MLA's q_a/kv_a are whole, and experts go to the ep rank that vLLM's
determine_expert_map gives them.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

from ownership import DecisionError, load_ruleset
from ownership.lint import lint
from ownership.loading.loader import load
from ownership.placement.mesh import Mesh
from tests.conftest import FIXTURES
from tests.fixtures.quant import dequant

QUANT = FIXTURES / "quant"
VARIANTS = sorted(p.parent.relative_to(QUANT).as_posix() for p in QUANT.glob("*/*/config.json"))
MESHES = [f"ep={ep},tp={tp}" for ep in (2, 4) for tp in (1, 2, 4)]

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "q_b_proj", "kv_b_proj")
ROW = ("o_proj", "down_proj", "w2")
KV = ("k_proj", "v_proj")


def config(variant: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((QUANT / variant / "config.json").read_text())
    return data


@cache
def full(variant: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for path in sorted((QUANT / variant).glob("*.safetensors")):
        found, kinds = dequant.read_safetensors(path)
        arrays.update(found)
        dtypes.update(kinds)
    return arrays, dtypes


def scheme(variant: str) -> tuple[str, dict[str, Any]]:
    """The reference's scheme name and options for a variant."""
    quant = config(variant)["quantization_config"]
    method = quant["quant_method"]
    if method == "fp8":
        return "fp8_block", {"block_size": tuple(quant["weight_block_size"])}
    if method == "modelopt":
        return ("nvfp4" if quant["quant_algo"] == "NVFP4" else "fp8_scaled"), {}
    if method == "awq":
        return "awq", {"group_size": quant["group_size"]}
    if method == "gptq":
        return "gptq", {}
    if method == "mxfp4":
        return "mxfp4", {}
    fmt = quant["format"]
    return ("ct_pack" if fmt == "pack-quantized" else "fp8_scaled"), {}


def raw(tensor: torch.Tensor) -> np.ndarray:
    """A loaded tensor as the reference reads the file: F8 and BF16 as their bits."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8):
        return tensor.contiguous().view(torch.uint8).numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()


def dtype_name(tensor: torch.Tensor) -> str:
    names = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
    }
    return names.get(tensor.dtype, "I32")


def chunk(size: int, parts: int, part: int) -> slice:
    step = size // parts
    return slice(part * step, (part + 1) * step)


def expert_ids(num_experts: int, ep: int, coord: int) -> range:
    base, extra = divmod(num_experts, ep)
    start = coord * base + min(coord, extra)
    return range(start, start + base + (coord < extra))


def expected_slice(
    key: str, shape: tuple[int, ...], coords: dict[str, int], mesh: Mesh, quant: str
) -> tuple[slice, ...]:
    """The part of a dequantized weight vLLM gives these coordinates, from its name alone."""
    tp, t = mesh.size("tp"), coords.get("tp", 0)
    module = key.split(".")[-2] if quant != "mxfp4" else key.rsplit(".", 1)[-1]
    whole = tuple(slice(None) for _ in shape)
    if quant == "mxfp4":  # [E, N, K] per expert: gate_up cut on its interleaved rows, down on its columns
        if module.startswith("gate_up_proj"):
            return (slice(None), chunk(shape[1], tp, t), slice(None))
        return (slice(None), slice(None), chunk(shape[2], tp, t))
    if module in KV and tp > 2:  # 2 kv heads: each on tp / 2 ranks
        return (chunk(shape[0], 2, t // (tp // 2)), slice(None))
    if module in COLUMN:
        return (chunk(shape[0], tp, t), slice(None))
    if module in ROW:
        return (slice(None), chunk(shape[1], tp, t))
    return whole


EXPERT = re.compile(r"\.experts\.(\d+)\.")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rank_dequantizes_to_its_slice_and_the_ranks_to_the_whole(variant: str) -> None:
    arrays, dtypes = full(variant)
    name, options = scheme(variant)
    whole = dequant.dequantize_state_dict(name, dict(arrays), dict(dtypes), **options)
    cfg = config(variant)
    num_experts = next(cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in cfg)
    legal = 0
    for text in MESHES:
        if lint("auto", QUANT / variant, mesh=text).exit_code:
            continue
        legal += 1
        mesh = Mesh.parse(text)
        seen = {key: np.zeros(value.shape, dtype=np.int32) for key, value in whole.items()}
        for rank in range(mesh.num_ranks):
            coords = mesh.coords(rank)
            loaded = load("auto", QUANT / variant, mesh=mesh, rank=rank).tensors
            local = {key: raw(tensor) for key, tensor in loaded.items()}
            kinds = {key: dtype_name(tensor) for key, tensor in loaded.items()}
            if name == "ct_pack":  # the logical shape each rank's packed weight stands for
                for key in [k for k in local if k.endswith(".weight_packed")]:
                    rows = local[key].shape[0]
                    cols = local[key.replace("weight_packed", "weight_scale")].shape[1] * (
                        whole[key.replace("weight_packed", "weight")].shape[1]
                        // arrays[key.replace("weight_packed", "weight_scale")].shape[1]
                    )
                    local[key.replace("weight_packed", "weight_shape")] = np.array(
                        [rows, cols], dtype=np.int64
                    )
            if name == "gptq":  # g_idx holds global group ids; a rank's own scales start at its first group
                for key in [k for k in local if k.endswith(".g_idx")]:
                    scales = key.replace("g_idx", "scales")
                    if local[scales].shape[0] != arrays[scales].shape[0]:
                        local[key] = local[key] - local[key].min()
            ours = dequant.dequantize_state_dict(name, local, kinds, **options)
            for key, value in whole.items():
                expert = EXPERT.search(key)
                holds = expert is None or int(expert.group(1)) in expert_ids(
                    num_experts, mesh.size("ep"), coords["ep"]
                )
                if name == "mxfp4":
                    holds = True
                if not holds:
                    assert key not in ours, (text, rank, key)
                    continue
                part = expected_slice(key, value.shape, coords, mesh, name)
                if name == "mxfp4":
                    ids = list(expert_ids(num_experts, mesh.size("ep"), coords["ep"]))
                    part = (ids, *part[1:])  # type: ignore[assignment]
                assert key in ours, (text, rank, key)
                want = value[part]
                assert ours[key].shape == want.shape, (text, rank, key, ours[key].shape, want.shape)
                # Bit for bit; -0 and +0 are one value here (the reference's E2M1 code 8 is -0).
                assert np.array_equal(
                    ours[key].view(np.uint32) & 0x7FFFFFFF, want.view(np.uint32) & 0x7FFFFFFF
                ) and (np.array_equal(ours[key], want)), (text, rank, key)
                seen[key][part] += 1
        for key, count in seen.items():
            assert count.min() >= 1, (text, key)  # the ranks together give every element back
    assert legal >= (2 if "misaligned" in variant else 5), variant


# DeepSeek-V3's FP8 release, as a key list of its real names and shapes (config: hidden 7168, 61 layers of which
# the first 3 dense with MLP 18432, 256 routed experts of 2048 and one shared, MLA with q_lora 1536, kv_lora 512,
# 128 heads of 128 + 64 rope, v 128, vocab 129280, one MTP layer; 128 x 128 blocks).
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 3,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}


def deepseek_v3_fp8() -> list[tuple[str, str, list[int]]]:
    c = DEEPSEEK_V3
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]

    def linear(name: str, out: int, inp: int) -> list[tuple[str, str, list[int]]]:
        return [
            (f"{name}.weight", "F8_E4M3", [out, inp]),
            (f"{name}.weight_scale_inv", "F32", [-(-out // 128), -(-inp // 128)]),
        ]

    keys: list[tuple[str, str, list[int]]] = [
        ("model.embed_tokens.weight", "BF16", [c["vocab_size"], hidden]),
        ("model.norm.weight", "BF16", [hidden]),
        ("lm_head.weight", "BF16", [c["vocab_size"], hidden]),
    ]
    for layer in range(c["num_hidden_layers"] + 1):
        p = f"model.layers.{layer}"
        keys += [
            (f"{p}.input_layernorm.weight", "BF16", [hidden]),
            (f"{p}.post_attention_layernorm.weight", "BF16", [hidden]),
        ]
        keys += linear(f"{p}.self_attn.q_a_proj", c["q_lora_rank"], hidden)
        keys += [(f"{p}.self_attn.q_a_layernorm.weight", "BF16", [c["q_lora_rank"]])]
        keys += linear(f"{p}.self_attn.q_b_proj", heads * qk, c["q_lora_rank"])
        keys += linear(f"{p}.self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden)
        keys += [(f"{p}.self_attn.kv_a_layernorm.weight", "BF16", [c["kv_lora_rank"]])]
        keys += linear(
            f"{p}.self_attn.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]
        )
        keys += linear(f"{p}.self_attn.o_proj", hidden, heads * c["v_head_dim"])
        if layer < c["first_k_dense_replace"]:
            keys += linear(f"{p}.mlp.gate_proj", c["intermediate_size"], hidden)
            keys += linear(f"{p}.mlp.up_proj", c["intermediate_size"], hidden)
            keys += linear(f"{p}.mlp.down_proj", hidden, c["intermediate_size"])
            continue
        inter = c["moe_intermediate_size"]
        keys += [(f"{p}.mlp.gate.weight", "BF16", [c["n_routed_experts"], hidden])]
        keys += [(f"{p}.mlp.gate.e_score_correction_bias", "F32", [c["n_routed_experts"]])]
        for e in range(c["n_routed_experts"]):
            keys += linear(f"{p}.mlp.experts.{e}.gate_proj", inter, hidden)
            keys += linear(f"{p}.mlp.experts.{e}.up_proj", inter, hidden)
            keys += linear(f"{p}.mlp.experts.{e}.down_proj", hidden, inter)
        keys += linear(f"{p}.mlp.shared_experts.gate_proj", inter, hidden)
        keys += linear(f"{p}.mlp.shared_experts.up_proj", inter, hidden)
        keys += linear(f"{p}.mlp.shared_experts.down_proj", hidden, inter)
    mtp = f"model.layers.{c['num_hidden_layers']}"
    keys += [(f"{mtp}.{n}.weight", "BF16", [hidden]) for n in ("enorm", "hnorm", "shared_head.norm")]
    keys += [(f"{mtp}.eh_proj.weight", "BF16", [hidden, 2 * hidden])]
    keys += [(f"{mtp}.shared_head.head.weight", "BF16", [c["vocab_size"], hidden])]
    keys += [(f"{mtp}.embed_tokens.weight", "BF16", [c["vocab_size"], hidden])]
    return keys


@cache
def deepseek_v3_keys() -> list[tuple[str, str, list[int]]]:
    return deepseek_v3_fp8()


# At pp=2 the last stage also runs the MTP layer and the head, the first has the 3 small dense layers: 33 + 28
# layers (VLLM_PP_LAYER_PARTITION) even the stages out, where vLLM's default 31 + 30 leaves stage 1 at 1.06x.
STAGES = {"pp=2,ep=4,tp=2": {"pp_stage_sizes": [33, 28]}}


@pytest.mark.parametrize("mesh", ["ep=8", "tp=8", "pp=2,ep=4,tp=2"])
def test_deepseek_v3s_fp8_release_lints_clean_and_balanced(mesh: str) -> None:
    """At tp=8, 7168/8 = 896 (7 blocks), 2048/8 = 256 (2) and 18432/8 = 2304 (18 blocks) are block-aligned: every
    scale follows its weight, and no rank holds more than 1.05x the mean."""
    report = lint("auto", deepseek_v3_keys(), mesh=mesh, config=DEEPSEEK_V3, params=STAGES.get(mesh, {}))
    assert [f.text() for f in report.findings if f.level != "info"] == []
    balance = next(f for f in report.findings if f.check == "byte-balance")
    assert balance.data["max_over_mean"] <= 1.05, balance.message


def test_deepseek_v3s_fp8_release_is_refused_where_a_cut_splits_a_block() -> None:
    """tp=16 still cuts the experts' 2048 rows into whole blocks (128 rows, one block); tp=32 cuts them into
    64-row pieces, half a block, and lint refuses it, as vLLM's validate_fp8_block_shape does. (Five layers of the
    key list are enough to show it.)"""
    keys = [
        k for k in deepseek_v3_keys() if not k[0].startswith("model.layers.") or int(k[0].split(".")[2]) < 5
    ]
    assert lint("auto", keys, mesh="tp=16", config=DEEPSEEK_V3).exit_code == 0
    report = lint("auto", keys, mesh="tp=32", config=DEEPSEEK_V3)
    misaligned = [f for f in report.findings if f.check == "quant-misaligned"]
    assert {f.rule for f in misaligned} >= {"expert-column", "expert-row"}


VERDICTS = json.loads((QUANT / "fp8_block" / "vllm_verdicts.json").read_text())


@pytest.mark.parametrize("variant", ["deepseek_v3", "misaligned"])
@pytest.mark.parametrize("tp", [2, 4])
def test_block_fp8_cuts_are_refused_exactly_where_vllm_refuses_them(variant: str, tp: int) -> None:
    """vLLM 0.33.0's validate_fp8_block_shape and validate_fp8_block_shape_moe, run on the same layers at the same
    tp (tests/fixtures/quant/vllm_fp8_verdicts.py), refuse exactly the layers whose scales ownership refuses to cut
    (quant-misaligned)."""
    folder = QUANT / "fp8_block" / variant
    bound = load_ruleset("transformers-moe").bind(mesh=f"tp={tp}", config=config(f"fp8_block/{variant}"))
    arrays, _ = full(f"fp8_block/{variant}")
    ours: dict[str, str] = {}
    for module in VERDICTS[variant][str(tp)]:
        key = module + ".weight_scale_inv"
        try:
            bound.owners(key, arrays[key].shape)
            ours[module] = "ok"
        except DecisionError as error:
            assert error.code == "quant-misaligned", error
            ours[module] = "refused"
    theirs = {m: "ok" if v == "ok" else "refused" for m, v in VERDICTS[variant][str(tp)].items()}
    assert ours == theirs
    assert (lint("auto", folder, mesh=f"tp={tp}").exit_code == 0) == all(v == "ok" for v in theirs.values())


def test_a_gptq_llama_lints_clean_with_every_tensor_placed() -> None:
    """A GPTQ llama (AutoGPTQ's names: qweight, qzeros, scales, g_idx for every linear) at tp=2: every key is
    decided, the companions follow their weights, and nothing that carries a split is kept whole."""
    hidden, inter, heads, kv, group = 512, 1024, 8, 2, 128
    head_dim = hidden // heads
    layers = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    keys: list[tuple[str, str, list[int]]] = [
        ("model.embed_tokens.weight", "F16", [128, hidden]),
        ("model.norm.weight", "F16", [hidden]),
        ("lm_head.weight", "F16", [128, hidden]),
    ]
    for layer in range(2):
        keys.append((f"model.layers.{layer}.input_layernorm.weight", "F16", [hidden]))
        for module, (out, inp) in layers.items():
            p = f"model.layers.{layer}.{module}"
            keys += [
                (f"{p}.qweight", "I32", [inp // 8, out]),
                (f"{p}.qzeros", "I32", [inp // group, out // 8]),
                (f"{p}.scales", "F16", [inp // group, out]),
                (f"{p}.g_idx", "I32", [inp]),
            ]
    cfg = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "hidden_size": hidden,
        "vocab_size": 128,
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False},
    }
    report = lint("auto", keys, mesh="pp=2,tp=2", config=cfg)
    assert [f.text() for f in report.findings if f.level != "info"] == []
    bound = load_ruleset("llama").bind(mesh="tp=2", config=cfg)
    owners = bound.owners("model.layers.0.self_attn.o_proj.qzeros", (hidden // group, hidden // 8))
    assert [d.selection for _, d in owners] == [
        (((0, 2, 1),), None),
        (((2, 4, 1),), None),
    ]  # in/group rows cut


def test_legal_meshes_name_the_illegal_ones_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    """`ownership plan CHECKPOINT --legal-meshes 4`: every mesh of 4 ranks over pp, tp and ep, linted."""
    from ownership.cli import main

    assert (
        main(["plan", str(QUANT / "fp8_block" / "misaligned"), "--legal-meshes", "4", "--format", "json"])
        == 0
    )
    found = {v["mesh"]: v for v in json.loads(capsys.readouterr().out)}
    assert sorted(found) == ["ep=4", "pp=2,ep=2", "pp=2,tp=2", "pp=4", "tp=2,ep=2", "tp=4"]
    assert [m for m, v in found.items() if v["legal"]] == ["ep=4", "pp=2,ep=2", "pp=4"]
    assert found["tp=4"]["reason"].startswith(
        "quant-misaligned: tp=4 cuts in (3 blocks of 128) inside a block"
    )
    assert found["ep=4"]["max_bytes"] > 0
