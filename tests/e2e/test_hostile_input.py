"""Hostile input: every bad checkpoint, rule file, config, key list, param and mesh gets one `OwnershipError`
(exit 2 on the command line), within bounded time and memory, and leaves nothing half-written.

Each test names, in its docstring, what the code before this suite did with the same input ("before: ...").
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import stat
import struct
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ownership.formats.shardfile as shardfile
import ownership.loading.loader as loader_module
from ownership import CheckpointError, DecisionError, MeshError, RulesetError, load_ruleset
from ownership.cli import main
from ownership.formats import open_checkpoint
from ownership.lint import lint
from ownership.ruleset import Ruleset
from ownership.spec.template import compile_template
from tests.conftest import FIXTURES

ADAPTER = FIXTURES / "qwen3_moe" / "lora_per_expert"
DEEP = "[" * 50_000 + "]" * 50_000
LONG_NUMBER = "9" * 5000


def _safetensors(path: Path, header: Any, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _listing_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info, open_checkpoint(path) as checkpoint:
        checkpoint.entries()
    return str(info.value)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err


# Crashes with a traceback, before.


def test_deeply_nested_json_in_a_header(tmp_path: Path) -> None:
    """before: RecursionError out of json.loads."""
    path = _safetensors(tmp_path / "w.safetensors", ('{"w": ' + DEEP + "}").encode())
    assert _listing_error(path) == (
        f"{path}: corrupt or truncated safetensors file: found a header that is not JSON (nesting deeper than "
        "the interpreter's recursion limit (1000 levels)), expected a JSON header. Fix: re-download or re-save "
        "the file"
    )


@pytest.mark.parametrize(
    "content", [DEEP, '{"num_experts": ' + LONG_NUMBER + "}"], ids=["deep", "long-number"]
)
def test_hostile_config_and_index(tmp_path: Path, content: str) -> None:
    """before: RecursionError, or ValueError (Exceeds the limit (4300 digits)), out of json.loads."""
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "qwen3_moe" / "base", folder)
    (folder / "config.json").write_text(content)
    message = _listing_error(folder)
    assert message.startswith(f"{folder / 'config.json'}: cannot read JSON: found ")
    assert message.endswith("Fix: fix or remove the file")
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(content)
    message = _listing_error(folder)
    assert message.startswith(f"{folder / 'model.safetensors.index.json'}: cannot read the index: found ")
    assert message.endswith("expected a JSON object with a weight_map. Fix: re-download the index")


def test_long_number_in_a_header(tmp_path: Path) -> None:
    """before: ValueError out of json.loads."""
    path = _safetensors(
        tmp_path / "w.safetensors",
        ('{"w": {"dtype": "F32", "shape": [' + LONG_NUMBER + '], "data_offsets": [0, 4]}}').encode(),
    )
    assert "found a header that is not JSON (a number too long to read (Exceeds the limit (4300 digits)" in (
        _listing_error(path)
    )


def test_long_number_in_a_param(capsys: pytest.CaptureFixture[str]) -> None:
    """before: ValueError traceback from --param."""
    status, err = _cli(
        [
            "explain",
            "vllm-ep-lora",
            "m.experts.1.w",
            "--mesh",
            "ep=2",
            "--param",
            f"num_experts={LONG_NUMBER}",
        ],
        capsys,
    )
    assert status == 2
    assert err.startswith("error: cannot read a param value: found 9999999999")
    assert err.rstrip().endswith(
        "(5,000 characters), expected a number of up to 4,300 digits, a JSON list, or text. Fix: check the value"
    )


def test_rule_file_and_key_list_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """before: UnicodeDecodeError tracebacks."""
    rules = tmp_path / "r.toml"
    rules.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(RulesetError) as info:
        load_ruleset(rules)
    assert str(info.value) == (
        f"{rules}: cannot read rule file: found bytes that are not UTF-8 (invalid start byte at byte 8), "
        "expected a UTF-8 text file. Fix: save the file as UTF-8"
    )
    keys = tmp_path / "keys.txt"
    keys.write_bytes(b"m.experts.1.w\n\xff\n")
    status, err = _cli(
        [
            "plan",
            "vllm-ep-lora",
            "--keys",
            str(keys),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--param",
            "num_experts=4",
        ],
        capsys,
    )
    assert (status, err) == (
        2,
        f"error: {keys}: cannot read the key list: found bytes that are not UTF-8 (invalid start byte at byte "
        "14), expected a UTF-8 text file, one key a line. Fix: save the key list as UTF-8\n",
    )


def test_deeply_nested_toml() -> None:
    """before: RecursionError out of tomllib."""
    with pytest.raises(RulesetError) as info:
        Ruleset.from_text('name = "x"\nx = ' + "[" * 5000 + "]" * 5000, source="deep.toml")
    assert str(info.value) == (
        "deep.toml: not valid TOML: found nesting deeper than the interpreter's recursion limit. "
        "Fix: fix the TOML syntax at that line"
    )


@pytest.mark.parametrize("place", ["read-only", "folder", "under-a-file"])
def test_out_where_nothing_can_be_written(
    tmp_path: Path, place: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """before: OSError tracebacks (PermissionError, IsADirectoryError, NotADirectoryError)."""
    if place == "read-only":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        # Root writes into read-only folders; /sys refuses everyone.
        out = (folder if not os.access(folder, os.W_OK) else Path("/sys")) / "rank0.safetensors"
    elif place == "folder":
        out = tmp_path / "a-folder"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "rank0.safetensors"
    status, err = _cli(
        [
            "load",
            str(ADAPTER),
            "--config",
            str(FIXTURES / "qwen3_moe/base/config.json"),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert status == 2
    expected = (
        f"error: {out}: the output is a folder: expected a file name. Fix: name a .safetensors file"
        if place == "folder"
        else f"error: {out}: cannot write the output: found "
    )
    assert err.startswith(expected)
    assert not list(tmp_path.rglob("*.tmp"))


def test_checkpoint_rewritten_while_the_output_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """before: the output was written from views of the checkpoint's pages (SafetensorError, or SIGBUS on a
    truncated file). Now `ownership load` reads private copies: a checkpoint cut short meanwhile changes nothing
    of what was read."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    weights = adapter / "adapter_model.safetensors"
    real_save = shardfile.save_file

    def truncating_save(tensors: dict[str, torch.Tensor], path: str, **options: Any) -> None:
        with weights.open("r+b") as handle:
            handle.truncate(64)
        real_save(tensors, path, **options)

    monkeypatch.setattr(shardfile, "save_file", truncating_save)
    out = tmp_path / "rank0.safetensors"
    status, _ = _cli(
        [
            "load",
            str(adapter),
            "--config",
            str(FIXTURES / "qwen3_moe/base/config.json"),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert status == 0
    written = shardfile.assemble([out], check_coverage=False)
    with open_checkpoint(ADAPTER / "adapter_model.safetensors") as checkpoint:
        for key, tensor in written.items():
            assert torch.equal(tensor, checkpoint.read(key))


def test_load_distributed_without_a_process_group() -> None:
    """before: ValueError ('Default process group has not been initialized') out of torch.distributed."""
    from ownership.torch_distributed import load_distributed

    with pytest.raises(MeshError) as info:
        load_distributed("vllm-ep-lora", ADAPTER, mesh="ep=2")
    assert str(info.value) == (
        "no torch.distributed process group is initialised. Fix: call torch.distributed.init_process_group "
        "(torchrun sets RANK and WORLD_SIZE) before building the mesh"
    )


def test_ctrl_c(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """before: a KeyboardInterrupt traceback and exit 1."""

    def interrupted(*args: Any, **options: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loader_module, "load", interrupted)
    status, err = _cli(
        [
            "load",
            str(ADAPTER),
            "--config",
            str(FIXTURES / "qwen3_moe/base/config.json"),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        capsys,
    )
    assert (status, err) == (130, "interrupted\n")


# Unbounded work, before.


def test_an_absurd_expert_count_from_a_config_fails_at_once(tmp_path: Path) -> None:
    """before: num_experts = 10**12 allocated per-rank slot tables until memory ran out (10**9: 99 s, 22 GB)."""
    started = time.perf_counter()
    with pytest.raises(RulesetError) as info:
        load_ruleset("vllm-ep-lora").plan(
            ["m.experts.1.w.lora_A.weight"], mesh="ep=8", rank=0, config={"num_experts": 10**12}
        )
    assert time.perf_counter() - started < 2
    assert str(info.value) == (
        "vllm-ep-lora.toml (built-in): rule 'routed-expert': the size of index 'expert' is over the limit: found "
        "num_experts=1000000000000 ids, expected at most 1,048,576 (MAX_INDEX_SIZE). Fix: check the param behind "
        "the size of 'expert' against the model's config; if it is right, raise ownership.limits.MAX_INDEX_SIZE "
        "(docs/limits.md)"
    )


def test_absurd_shapes_in_a_key_list(tmp_path: Path) -> None:
    """before: a [10**14, 32] shape listed every index of the cut dim; negative dims gave negative bytes."""
    keys = tmp_path / "keys.txt"
    keys.write_text("m.experts.lora_A.weight\tF32\t[100000000000000,32]\n")
    with pytest.raises(DecisionError) as info:
        lint("vllm-ep-lora", _read(keys), mesh="ep=2", params={"num_experts": 4})
    assert "the tensor's element count is over the limit: found shape [100000000000000, 32]" in str(
        info.value
    )
    keys.write_text("m.experts.lora_A.weight\tF32\t[200000000,32]\n")
    started = time.perf_counter()
    report = lint("vllm-ep-lora", _read(keys), mesh="ep=2", params={"num_experts": 4})
    assert time.perf_counter() - started < 2
    assert [f.text() for f in report.findings if f.check == "limit"] == [
        "error limit: rule 'fused-expert-lora-a': key 'm.experts.lora_A.weight': dim 0 of the tensor, which the "
        "rule cuts, is over the limit (found size 200,000,000, expected at most 16,777,216 (MAX_CUT_DIM)). Fix: "
        "check the tensor's shape; if it is right, raise ownership.limits.MAX_CUT_DIM (docs/limits.md)"
    ]
    keys.write_text("m.experts.1.w\tF32\t[-4,32]\n")
    with pytest.raises(DecisionError) as info:
        _read(keys)
    assert str(info.value) == (
        f"{keys}, line 1: key 'm.experts.1.w': a shape with a negative dim: found [-4, 32], expected dims >= 0. "
        "Fix: write the tensor's shape as its header gives it"
    )


def _read(path: Path) -> list[Any]:
    from ownership.loading.entries import read_keys_path

    return read_keys_path(path)


def test_negative_shape_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """before: --shape -4,32 gave a negative byte count."""
    with pytest.raises(SystemExit) as info:
        main(
            [
                "explain",
                "llama",
                "model.layers.0.self_attn.q_proj.weight",
                "--mesh",
                "tp=2",
                "--shape=-4,32",
            ]
        )
    assert info.value.code == 2
    assert "a shape with a negative dim: found [-4, 32]" in capsys.readouterr().err


def test_a_mesh_of_a_trillion_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    """before: --all-ranks on ep=10**12 allocated per rank until memory ran out."""
    status, err = _cli(
        [
            "plan",
            "vllm-ep-lora",
            str(ADAPTER),
            "--mesh",
            "ep=1000000000000",
            "--all-ranks",
            "--param",
            "num_experts=8",
        ],
        capsys,
    )
    assert (status, err) == (
        2,
        "error: the mesh ep=1000000000000 is over the limit: found 1,000,000,000,000 ranks, expected at most "
        "65,536 (MAX_RANKS). Fix: check the axis sizes; if it is right, raise ownership.limits.MAX_RANKS "
        "(docs/limits.md)\n",
    )


def test_a_50_mb_rule_file_fails_at_once(tmp_path: Path) -> None:
    """before: minutes of parsing."""
    path = tmp_path / "big.toml"
    path.write_text('name = "big"\n' + ('[[rule]]\nid = "r"\nmatch = "**"\n' * 1_700_000))
    assert path.stat().st_size > 50 * 2**20
    started = time.perf_counter()
    with pytest.raises(RulesetError) as info:
        load_ruleset(path)
    assert time.perf_counter() - started < 2
    assert str(info.value).startswith(
        f"{path}: rule file is over the limit: found 52,700,013 bytes, expected at most 1,048,576 "
        "(MAX_RULE_FILE_BYTES)"
    )


# Hangs, before.


@pytest.mark.parametrize(
    ("regex", "why"),
    [
        ("(a+)+$", "can backtrack exponentially: nested quantifier '(a+)+'"),
        ("(?:a|aa)+b", "can backtrack exponentially: an alternation inside the repeat '(?:a|aa)+'"),
        (
            "(?:[^.]+\\.)*(?:[^.]+\\.)*w",
            "can take more than linear time: a repeat that can stop in many places, followed by more than a "
            "literal character ('(?:[^.]+\\\\.)*')",
        ),
    ],
)
def test_regexes_that_can_stall_are_refused_at_load(regex: str, why: str) -> None:
    """before: `(a+)+$` loaded and backtracked forever on a long key; `(?:a|aa)+b` passed lint's heuristic."""
    text = f'name = "x"\n[[rule]]\nid = "slow"\nregex = \'{regex}\'\n'
    with pytest.raises(RulesetError) as info:
        Ruleset.from_text(text, source="x.toml")
    assert str(info.value) == (
        f"x.toml: rule 'slow': raw regex {why}. Fix: make the inner quantifier possessive (x++) or the group "
        "atomic ((?>...)), or use a template"
    )


@pytest.mark.parametrize(
    ("template", "key"),
    [
        ("**.x.**.y.**.z", "x." * 1500 + "y." * 500 + "q"),
        ("**.a.**.a.**.a.**.b", "a." * 2000 + "c"),
        ("**.layers.<layer>.**.experts.<e>.w", "layers.1." * 400 + "experts.x.w"),
    ],
)
def test_templates_match_hostile_keys_in_linear_time(template: str, key: str) -> None:
    """before: `**` compiled to lazy repeats that retried each other: O(n^k) for k gaps (minutes per key)."""
    match = __import__("re").compile(compile_template(template).regex).fullmatch
    started = time.perf_counter()
    match(key)
    assert time.perf_counter() - started < 0.05


def test_many_optional_groups_are_over_the_limit() -> None:
    """before: `{a,}` groups compiled to 2^k ways to retry."""
    with pytest.raises(RulesetError) as info:
        compile_template("**." + "{a,}" * 12 + "b", rule="r", source="x.toml")
    assert str(info.value).startswith(
        "x.toml: rule 'r': the alternatives of the template is over the limit: found 4,096 ways through its {…}"
    )


# Silent corruption, before.


def test_duplicate_key_in_a_header(tmp_path: Path) -> None:
    """before: the last of the two kept, the other tensor's bytes loaded under its name."""
    raw = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    path = _safetensors(tmp_path / "w.safetensors", raw, b"\0" * 8)
    assert _listing_error(path) == (
        f"{path}: key 'a': corrupt or truncated safetensors file: found the key 'a' twice in the header, expected "
        "each key once. Fix: re-download or re-save the file"
    )


@pytest.mark.parametrize(
    ("offsets", "found"),
    [
        ([[0, 8], [4, 12]], "data offsets [4, 12] overlapping after 'a', which ends at 8"),
        ([[0, 8], [12, 20]], "data offsets [12, 20] leaving a hole after 'a', which ends at 8"),
        (
            [[4, 12], [12, 20]],
            "data offsets [4, 12] leaving a hole at the start of the data, which ends at 0",
        ),
    ],
)
def test_offsets_that_do_not_tile_the_data(tmp_path: Path, offsets: list[list[int]], found: str) -> None:
    """before: overlapping offsets and holes were accepted (safetensors itself refuses both)."""
    header = {
        key: {"dtype": "F32", "shape": [2], "data_offsets": span}
        for key, span in zip("ab", offsets, strict=True)
    }
    path = _safetensors(tmp_path / "w.safetensors", header, b"\0" * 20)
    message = _listing_error(path)
    assert found in message
    assert message.endswith(
        "expected each tensor's bytes right after the one before, as safetensors writes them. Fix: re-download "
        "or re-save the file"
    )


def test_bytes_after_the_last_tensor(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    assert "found 16 bytes after the last tensor's, expected a file that ends with the last tensor" in (
        _listing_error(path)
    )


class _Record:
    """A pickled tensor record with the fields chosen by the test (`torch._utils._rebuild_tensor_v2`)."""

    def __init__(self, storage: str, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.args = (storage, offset, shape, stride)

    def __reduce__(self) -> tuple[Any, ...]:
        storage, offset, shape, stride = self.args
        return (
            torch._utils._rebuild_tensor_v2,
            (_Storage(storage), offset, shape, stride, False, OrderedDict()),
        )


class _Storage:
    def __init__(self, key: str) -> None:
        self.key = key


def _torch_zip(path: Path, records: dict[str, _Record], storages: dict[str, tuple[bytes, int]]) -> Path:
    """A zip laid out as torch.save lays it out, with storages claiming `numel` elements over `data`."""

    class Writer(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", storages[obj.key][1])
            return None

    buffer = io.BytesIO()
    Writer(buffer, protocol=2).dump(OrderedDict(records))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, (data, _) in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


def test_bin_record_with_a_negative_storage_offset(tmp_path: Path) -> None:
    """before: the tensor's bytes were read from before its record: zip headers and padding."""
    data = struct.pack("<4f", 1, 2, 3, 4)
    path = _torch_zip(tmp_path / "m.bin", {"w": _Record("0", -2, (2,), (1,))}, {"0": (data, 4)})
    assert _listing_error(path) == (
        f"{path}: key 'w': cannot read the PyTorch checkpoint: found storage offset -2 of a storage of 4 "
        "elements, expected a tensor record as torch.save writes it. Fix: re-download or re-save the file"
    )


def test_bin_storage_larger_than_its_record(tmp_path: Path) -> None:
    """before: a storage claiming more elements than its record held read into the next record."""
    data = struct.pack("<4f", 1, 2, 3, 4)
    records = {"w": _Record("0", 0, (8,), (1,)), "v": _Record("1", 0, (4,), (1,))}
    path = _torch_zip(tmp_path / "m.bin", records, {"0": (data, 8), "1": (data, 4)})
    assert _listing_error(path) == (
        f"{path}: key 'w': cannot read the PyTorch checkpoint: found a storage of 8 elements of 4 bytes in a "
        "record of 16 bytes, expected a tensor record as torch.save writes it. Fix: re-download or re-save the "
        "file"
    )
    records = {"w": _Record("0", 2, (4,), (1,))}
    path = _torch_zip(tmp_path / "n.bin", records, {"0": (data, 4)})
    assert "found shape [4] and stride [1] from offset 2 past the end of its storage of 4 elements" in (
        _listing_error(path)
    )


# Half-written output, before.


def test_sigterm_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """before: SIGTERM killed the process with the temporary file left beside the output."""
    real_save = shardfile.save_file

    def killed_half_way(tensors: dict[str, torch.Tensor], path: str, **options: Any) -> None:
        real_save(tensors, path, **options)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(shardfile, "save_file", killed_half_way)
    out = tmp_path / "rank0.safetensors"
    status, err = _cli(
        [
            "load",
            str(ADAPTER),
            "--config",
            str(FIXTURES / "qwen3_moe/base/config.json"),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert (status, err) == (143, "terminated\n")
    assert list(tmp_path.iterdir()) == []


def test_output_follows_the_umask_and_never_overwrites_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """before: outputs were -rw------- (mkstemp's mode), and --out onto the checkpoint's own file replaced it."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    base = ["--config", str(FIXTURES / "qwen3_moe/base/config.json"), "--mesh", "ep=2", "--rank", "0"]
    old = os.umask(0o022)
    try:
        out = tmp_path / "rank0.safetensors"
        assert main(["load", str(adapter), *base, "--out", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
    finally:
        os.umask(old)
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    capsys.readouterr()
    status, err = _cli(["load", str(adapter), *base, "--out", str(weights)], capsys)
    assert (status, err) == (
        2,
        f"error: {weights}: the output would overwrite a file of the checkpoint being read: expected a file "
        "outside the checkpoint. Fix: choose another --out\n",
    )
    assert weights.read_bytes() == before
