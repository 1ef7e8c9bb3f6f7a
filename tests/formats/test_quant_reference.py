"""The NumPy dequantization references (``tests/fixtures/quant/dequant.py``) against the formats' own tools.

Three kinds of evidence, none of which needs the tools installed:

* every quantized fixture dequantizes, and agrees bit for bit (after casting to the tool's output
  dtype, ``-0`` taken as ``+0``) with the tool's own dequantization stored beside it in
  ``dequant.expected`` (SHA-256 of every weight, rows of a few);
* the element decoders equal torch's ``float8_e4m3fn`` / ``float8_e8m0fnu`` for all 256 codes and the
  OCP E2M1 value list;
* each format's layout (pack order, nibble order, zero offset, ``g_idx``, partial blocks) is
  checked against a naive packing written from the format's description, and quantizing a known
  float tensor then dequantizing it stays within the format's error bound (exact where the values
  are representable).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import FIXTURES
from tests.fixtures.quant import dequant
from tests.fixtures.quant.make_quant_fixtures import cut_units, quantize_fp8_block, vllm_cut

QUANT = FIXTURES / "quant"
EXPECTED = "dequant.expected"
VARIANTS = sorted(p.parent.relative_to(QUANT).as_posix() for p in QUANT.glob(f"*/*/{EXPECTED}"))
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
E2M1_SPEC = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX v1.0, table of FP4 E2M1 magnitudes


def _folder_arrays(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    arrays: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != EXPECTED:
            a, d = dequant.read_safetensors(path)
            arrays.update(a)
            dtypes.update(d)
    return arrays, dtypes


def _as_tool(values: np.ndarray[Any, Any], dtype: str) -> torch.Tensor:
    """Reference float32 values in a tool's dtype, ``-0`` made ``+0``."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(TORCH_DTYPES[dtype])
    return tensor + torch.zeros((), dtype=tensor.dtype)


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _ours(variant: str) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
    """The reference's dequantization of a fixture, and the fixture's expected-file record."""
    folder = QUANT / variant
    meta: dict[str, Any] = json.loads(dequant.read_metadata(folder / EXPECTED)["expected"])
    arrays, dtypes = _folder_arrays(folder)
    ours = dequant.dequantize_state_dict(meta["scheme"], arrays, dtypes, **meta["scheme_args"])
    return ours, meta


def test_every_family_has_fixtures() -> None:
    assert {v.split("/")[0] for v in VARIANTS} == {
        "fp8_block",
        "fp8_tensor",
        "mxfp4",
        "nvfp4",
        "awq",
        "gptq",
        "compressed_tensors",
    }
    versions = json.loads((QUANT / "VERSIONS.json").read_text())
    assert set(versions["variants"]) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_equals_the_tools_own_dequantization(variant: str) -> None:
    from safetensors.torch import load_file

    ours, meta = _ours(variant)
    digests = meta["digests"]
    skipped = meta["skipped"]
    assert set(ours) == set(digests) | set(skipped)
    assert all(np.isfinite(v).all() for v in ours.values())
    for key, info in digests.items():
        assert list(ours[key].shape) == info["shape"], key
        assert _sha256(_as_tool(ours[key], info["dtype"])) == info["sha256"], (
            f"{variant}: {key} differs from {meta['tool']}"
        )
    windows = load_file(str(QUANT / variant / EXPECTED))
    assert windows
    for key, expected in windows.items():
        mine = _as_tool(ours[key], digests[key]["dtype"])
        rows = mine.shape[-2]
        if rows > 16:
            mine = torch.cat([mine[..., :8, :], mine[..., -8:, :]], dim=-2)
        assert torch.equal(mine, expected + torch.zeros((), dtype=expected.dtype)), key


def test_sharded_fixtures_split_a_module_across_files() -> None:
    sharded = [v for v in VARIANTS if (QUANT / v / "model.safetensors.index.json").exists()]
    assert len(sharded) >= 4
    for variant in sharded:
        folder = QUANT / variant
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        for name in set(weight_map.values()):
            assert set(dequant.read_safetensors(folder / name)[0]) == {
                k for k, f in weight_map.items() if f == name
            }
        by_module: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            by_module.setdefault(key.rsplit(".", 1)[0].removesuffix("_blocks"), set()).add(name)
        assert any(len(files) == 2 for files in by_module.values()), variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_parallel_cuts_are_whole_units_except_in_misaligned(variant: str) -> None:
    ours, meta = _ours(variant)
    config = json.loads((QUANT / variant / "config.json").read_text())
    out_unit, in_unit = cut_units(meta["scheme"], config["quantization_config"])
    kv_heads = config["num_key_value_heads"] if config["model_type"] != "deepseek_v3" else 0
    broken = []
    for key, weight in ours.items():
        dim, unit = {"out": (-2, out_unit), "in": (-1, in_unit), "none": (0, 0)}[vllm_cut(key)]
        for tp in (2, 4):
            if unit == 0:
                continue
            ranks = min(tp, kv_heads) if kv_heads and key.endswith(("k_proj.weight", "v_proj.weight")) else tp
            if weight.shape[dim] % (ranks * unit):
                broken.append((key, tp))
    assert bool(broken) == (variant == "fp8_block/misaligned"), broken[:4]


def test_fp8_block_scales_are_ceil_shaped() -> None:
    arrays, _ = _folder_arrays(QUANT / "fp8_block" / "misaligned")
    config = json.loads((QUANT / "fp8_block" / "misaligned" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    partial = 0
    for key, scale in arrays.items():
        if key.endswith(".weight_scale_inv"):
            out, inp = arrays[key.removesuffix("_scale_inv")].shape
            assert scale.shape == (math.ceil(out / 128), math.ceil(inp / 128)), key
            partial += out % 128 != 0 or inp % 128 != 0
    assert partial > 0


def test_fp8_block_skipped_weights_match_a_tile_loop_with_torchs_decoder() -> None:
    # transformers cannot dequantize a partial block in a multi-block dim; this is the independent check.
    ours, meta = _ours("fp8_block/misaligned")
    skipped = meta["skipped"]
    assert skipped
    arrays, _ = _folder_arrays(QUANT / "fp8_block" / "misaligned")
    for key in skipped:
        codes = torch.from_numpy(np.array(arrays[key])).view(torch.float8_e4m3fn).float()
        scale = torch.from_numpy(np.array(arrays[key + "_scale_inv"]))
        expected = torch.empty_like(codes)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                tile = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
                expected[tile] = codes[tile] * scale[i, j]
        assert torch.equal(torch.from_numpy(ours[key]), expected), key


def test_e4m3_table_equals_torch_for_all_codes() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    theirs = codes.view(torch.float8_e4m3fn).float().numpy()
    ours = dequant.e4m3_table()
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.array_equal(ours.view(np.uint32)[~np.isnan(ours)], theirs.view(np.uint32)[~np.isnan(theirs)])
    assert np.nanmax(ours) == 448.0 and int(np.isnan(ours).sum()) == 2


def test_e8m0_decoder_equals_torch_for_all_codes() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    theirs = codes.view(torch.float8_e8m0fnu).float().numpy()
    ours = dequant.decode_e8m0(codes.numpy())
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.array_equal(ours[:255], theirs[:255])
    assert ours[127] == 1.0 and ours[0] == 2.0**-127


def test_e2m1_table_is_the_spec_list() -> None:
    table = dequant.e2m1_table()
    assert table[:8].tolist() == E2M1_SPEC
    assert table[8:].tolist() == [-v for v in E2M1_SPEC]
    assert math.copysign(1.0, float(table[8])) == -1.0


def test_fp8_block_round_trip_within_the_e4m3_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(300, 200), (130, 1), (1, 1), (128, 256), (257, 129)]:
        x = torch.randn(*shape, generator=gen) * torch.exp(2 * torch.randn(shape[0], 1, generator=gen))
        codes, scale_inv = quantize_fp8_block(x)
        assert tuple(scale_inv.shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
        back = dequant.dequant_fp8_block(codes.view(torch.uint8).numpy(), scale_inv.numpy())
        s = np.repeat(np.repeat(scale_inv.numpy(), 128, 0), 128, 1)[: shape[0], : shape[1]]
        # E4M3 keeps 3 mantissa bits: rounding to nearest is within 2**-4 relative, 2**-10 absolute (subnormals).
        bound = s * (np.abs(x.numpy()) / s * 2.0**-4 + 2.0**-10)
        assert (np.abs(back - x.numpy()) <= bound * (1 + 1e-6)).all(), shape


def test_fp8_block_round_trip_is_exact_for_representable_values() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.from_numpy(dequant.e4m3_table())
    finite = torch.nonzero(~torch.isnan(table)).flatten()
    codes = finite[torch.randint(0, len(finite), (200, 300), generator=gen)].to(torch.uint8)
    codes[::128, ::128] = 0x7E  # +448 in every tile, so each tile's scale comes out exactly 2**k
    tiles = torch.tensor([[2.0**-3, 2.0**5, 1.0], [2.0**-7, 0.5, 2.0**2]])
    scale = tiles.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    x = table[codes.long()] * scale
    q, scale_inv = quantize_fp8_block(x)
    assert torch.equal(scale_inv, tiles)
    assert torch.equal(q.view(torch.uint8) & 0x7F, codes & 0x7F)  # +-0 may swap signs
    back = dequant.dequant_fp8_block(q.view(torch.uint8).numpy(), scale_inv.numpy())
    assert np.array_equal(back, x.numpy())


def _pack_words(
    values: np.ndarray[Any, Any], axis: int, order: tuple[int, ...] = tuple(range(8))
) -> np.ndarray[Any, Any]:
    """Naive packer: 8 consecutive 4-bit values along ``axis`` into one int32, field i holding order[i]."""
    values = np.moveaxis(values.astype(np.uint32), axis, -1)
    groups = values.reshape(*values.shape[:-1], -1, 8)
    word = np.zeros(groups.shape[:-1], dtype=np.uint32)
    for i, position in enumerate(order):
        word |= (groups[..., position] & 0xF) << np.uint32(4 * i)
    return np.moveaxis(word.view(np.int32), -1, axis)


def test_awq_layout() -> None:
    rng = np.random.default_rng(0)
    inp, out, group = 256, 24, 128
    q = rng.integers(0, 16, (inp, out))
    z = rng.integers(0, 16, (inp // group, out))
    s = rng.uniform(0.001, 0.1, (inp // group, out)).astype(np.float16).astype(np.float32)
    qweight = _pack_words(q, axis=1, order=dequant.AWQ_PACK_ORDER)
    qzeros = _pack_words(z, axis=1, order=dequant.AWQ_PACK_ORDER)
    expected = ((q - np.repeat(z, group, 0)) * np.repeat(s, group, 0)).T.astype(np.float32)
    assert np.array_equal(dequant.dequant_awq_gemm(qweight, qzeros, s, group), expected)
    # Column 1 sits in nibble 4 (order 0,2,4,6,1,3,5,7), not nibble 1.
    one = np.zeros((inp, out), dtype=np.int64)
    one[:, 1] = 3
    assert (dequant.unpack_int32_nibbles(_pack_words(one, 1, dequant.AWQ_PACK_ORDER), 1)[:, 4] == 3).all()


@pytest.mark.parametrize("permuted", [False, True])
def test_gptq_layout(permuted: bool) -> None:
    rng = np.random.default_rng(1)
    inp, out, group = 256, 16, 64
    g_idx = np.arange(inp) // group
    if permuted:
        g_idx = rng.permutation(g_idx)
    q = rng.integers(0, 16, (inp, out))
    zero = rng.integers(1, 16, (inp // group, out))  # v1 stores zero - 1, so zero >= 1 here
    s = rng.uniform(0.001, 0.1, (inp // group, out)).astype(np.float16).astype(np.float32)
    qweight = _pack_words(q, axis=0)
    qzeros = _pack_words(zero - 1, axis=1)
    expected = ((q - zero[g_idx]) * s[g_idx]).T.astype(np.float32)
    assert np.array_equal(dequant.dequant_gptq(qweight, qzeros, s, g_idx.astype(np.int32)), expected)
    # GPTQModel's v2 format stores the zero itself.
    v2 = dequant.dequant_gptq(qweight, _pack_words(zero, axis=1), s, g_idx.astype(np.int32), zero_offset=0)
    assert np.array_equal(v2, expected)


def test_gptq_fixtures_desc_act_and_channelwise() -> None:
    arrays, _ = _folder_arrays(QUANT / "gptq" / "desc_act")
    g_idx = arrays["model.layers.0.self_attn.o_proj.g_idx"]
    assert not np.array_equal(g_idx, np.sort(g_idx))
    assert np.array_equal(np.bincount(g_idx), np.full(g_idx.size // 128, 128))
    arrays, _ = _folder_arrays(QUANT / "gptq" / "channelwise")
    assert arrays["model.layers.0.self_attn.o_proj.scales"].shape[0] == 1
    assert not (arrays["model.layers.0.self_attn.o_proj.g_idx"]).any()
    config = json.loads((QUANT / "gptq" / "channelwise" / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == -1 and config["quant_method"] == "gptq" and config["sym"] is False


@pytest.mark.parametrize("asymmetric", [False, True])
def test_ct_pack_layout(asymmetric: bool) -> None:
    rng = np.random.default_rng(2)
    out, inp, group = 24, 256, 128
    q = rng.integers(-8, 8, (out, inp))
    zp = (
        rng.integers(-8, 8, (out, inp // group))
        if asymmetric
        else np.zeros((out, inp // group), dtype=np.int64)
    )
    s = rng.uniform(0.001, 0.1, (out, inp // group)).astype(np.float32)
    packed = _pack_words(q + 8, axis=1)
    zero_point = _pack_words(zp + 8, axis=0) if asymmetric else None
    expected = ((q - np.repeat(zp, group, 1)) * np.repeat(s, group, 1)).astype(np.float32)
    got = dequant.dequant_ct_pack(packed, s, np.array([out, inp]), zero_point)
    assert np.array_equal(got, expected)


def test_mxfp4_layout() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (2, 3, 64))
    exps = rng.integers(110, 140, (2, 3, 2))
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8).reshape(2, 3, 2, 16)
    values = np.array([math.copysign(E2M1_SPEC[c & 7], -1.0 if c & 8 else 1.0) for c in codes.reshape(-1)])
    expected = (
        (values.reshape(2, 3, 2, 32) * np.exp2(exps - 127.0)[..., None]).reshape(2, 3, 64).astype(np.float32)
    )
    assert np.array_equal(dequant.dequant_mxfp4(blocks, exps.astype(np.uint8)), expected)
    assert dequant.dequant_mxfp4(np.full((1, 1, 16), 0x21, np.uint8), np.array([[127]], np.uint8))[
        0, :2
    ].tolist() == [0.5, 1.0]


def test_nvfp4_layout_and_round_trip() -> None:
    rng = np.random.default_rng(4)
    out, inp = 8, 64
    codes = rng.integers(0, 16, (out, inp))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scale_codes = rng.integers(0x30, 0x50, (out, inp // 16)).astype(np.uint8)
    second = np.float32(0.0123)
    block = torch.from_numpy(scale_codes).view(torch.float8_e4m3fn).float().numpy() * second
    values = np.array(
        [math.copysign(E2M1_SPEC[c & 7], -1.0 if c & 8 else 1.0) for c in codes.reshape(-1)], np.float32
    )
    expected = values.reshape(out, inp // 16, 16) * block[..., None]
    assert np.array_equal(
        dequant.dequant_nvfp4(packed, scale_codes, np.array(second)), expected.reshape(out, inp)
    )


def test_fp8_scaled() -> None:
    codes = torch.randn(4, 6).to(torch.float8_e4m3fn)
    scale = np.float32(0.37)
    expected = codes.float().numpy() * scale
    assert np.array_equal(
        dequant.dequant_fp8_tensor(codes.view(torch.uint8).numpy(), np.array(scale)), expected
    )
    assert np.array_equal(
        dequant.dequant_fp8_tensor(codes.view(torch.uint8).numpy(), np.array([scale])), expected
    )
    rows = np.arange(1, 5, dtype=np.float32)[:, None]
    assert np.array_equal(
        dequant.dequant_fp8_channel(codes.view(torch.uint8).numpy(), rows), codes.float().numpy() * rows
    )


def test_shape_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="weight_scale_inv"):
        dequant.dequant_fp8_block(np.zeros((200, 130), np.uint8), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="qzeros"):
        dequant.dequant_awq_gemm(
            np.zeros((256, 2), np.int32), np.zeros((1, 2), np.int32), np.ones((2, 16), np.float32), 128
        )
    with pytest.raises(ValueError, match="blocks"):
        dequant.dequant_mxfp4(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
