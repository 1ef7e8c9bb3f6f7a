"""The command line and the Python API as a new user meets them. Each test says what the code before it did
("before: ...")."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ownership
from ownership import RulesetError, load_ruleset
from ownership.cli import main
from ownership.spec.builtin import builtin_names
from ownership.torch_distributed import load_distributed
from tests.conftest import FIXTURES, ROOT

BASE = FIXTURES / "qwen3_moe" / "base"
ADAPTER = FIXTURES / "qwen3_moe" / "lora_per_expert"
CONFIG = BASE / "config.json"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# The Python API.


def test_load_takes_names_auto_and_dtype_names() -> None:
    """before: `ownership.load("vllm-ep-lora", ...)` raised AttributeError ('str' object has no attribute
    'bind'); there was no `auto`; `dtype="bfloat16"` raised another AttributeError."""
    by_name = ownership.load("transformers-moe", BASE, mesh="ep=2", rank=1)
    auto = ownership.load("auto", BASE, mesh="ep=2", rank=1, dtype="bf16")
    assert sorted(by_name.tensors) == sorted(auto.tensors)
    assert {t.dtype for t in auto.tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert ownership.plan("auto", BASE, mesh="ep=2", rank=1).index == by_name.plan.index
    with pytest.raises(ownership.CheckpointError, match="unknown dtype 'bfloat17'"):
        ownership.load("auto", BASE, mesh="ep=2", rank=1, dtype="bfloat17")


def test_a_loaded_share_fits_load_state_dict(tmp_path: Path) -> None:
    """The documented one-liner: `model.load_state_dict(ownership.load(...).tensors)`."""
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    everything = ownership.Ruleset.from_text('name = "all"\ndefault = "replicate"\n')
    fresh.load_state_dict(
        ownership.load(everything, tmp_path / "model.safetensors", mesh="dp=1", rank=0).tensors
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )


def test_load_distributed_takes_config() -> None:
    """before: load_distributed had no `config=`."""
    assert "config" in inspect.signature(load_distributed).parameters


# Explain.


def test_explain_reads_config_auto_and_the_shape_from_a_checkpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """before: --config was ignored (one missing param per run, then a demand for --shape); `auto` was refused."""
    key = "model.layers.1.mlp.experts.4.gate_proj.weight"
    status, out, err = _run(
        ["explain", "auto", key, "--checkpoint", str(BASE), "--mesh", "ep=2,tp=2", "--format", "json"], capsys
    )
    assert status == 0, err
    result = json.loads(out)
    assert (result["rule"], result["shape"], [o["rank"] for o in result["owners"]]) == (
        "expert-column",
        [24, 32],
        [2, 3],
    )
    status, out, err = _run(
        ["explain", "transformers-moe", key, "--config", str(CONFIG), "--shape", "24,32", "--mesh", "ep=2"],
        capsys,
    )
    assert status == 0, err
    assert "owners   1 of 2 ranks of ep=2" in out


# Paths.


def test_a_mistyped_checkpoint_is_a_missing_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    """before: reported as an unreadable rule file, with no fix."""
    status, _, err = _run(["plan", str(ADAPTER) + "s", "--mesh", "ep=2", "--all-ranks"], capsys)
    assert (status, err) == (
        2,
        f"error: {ADAPTER}s: no such checkpoint: found no file or folder there. Fix: check the path (did you mean "
        f"{str(ADAPTER)!r}?)\n",
    )


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "model-00001-of-00002.safetensors"])
def test_an_index_or_a_shard_reads_its_folders_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """before: the config.json beside an index or a shard was ignored (no model_type, no params)."""
    status, out, err = _run(["plan", str(BASE / name), "--mesh", "ep=2", "--all-ranks"], capsys)
    assert status == 0, err
    assert "ruleset transformers-moe" in out.splitlines()[0]


def test_out_is_not_replaced_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """before: --out overwrote anything without a word."""
    out = tmp_path / "rank0.safetensors"
    out.write_bytes(b"precious")
    argv = ["load", str(BASE), "--mesh", "ep=2", "--rank", "0", "--out", str(out)]
    status, _, err = _run(argv, capsys)
    assert (status, err) == (
        2,
        f"error: {out}: the output exists: expected a new file. Fix: pass --force to replace it, or choose "
        "another --out\n",
    )
    assert out.read_bytes() == b"precious"
    assert _run([*argv, "--force"], capsys)[0] == 0
    assert out.read_bytes() != b"precious"


# The command itself.


def test_version_module_and_rules_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """before: no --version, no `python -m ownership`, and plain `ownership rules` printed the top-level help."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert (info.value.code, capsys.readouterr().out) == (0, f"ownership {ownership.__version__}\n")
    done = subprocess.run(
        [sys.executable, "-m", "ownership", "rules"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.splitlines()[0].split()[:2] == ["name", "extends"]
    status, out, _ = _run(["rules"], capsys)
    assert status == 0 and "transformers-moe" in out


@pytest.mark.parametrize("command", ["explain", "plan", "load", "lint", "test", "rules"])
def test_every_command_has_examples_in_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """before: no examples, and --format had no help text."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "examples:\n  ownership " + command in text
    if command not in ("rules",):
        assert "text for people (the default), json for programs" in text


# Output.


def _lines(out: str) -> list[str]:
    return out.splitlines()


def test_tables_fit_the_width_they_are_given(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """before: piped tables were always 200 columns with trailing spaces, ignoring COLUMNS; adapter keys broke
    over three lines at 100 columns; `rules list` was 50 lines at 80 columns (now a line per ruleset)."""
    argv = ["plan", "vllm-ep-lora", str(ADAPTER), "--config", str(CONFIG), "--mesh", "ep=2", "--rank", "1"]
    monkeypatch.setenv("COLUMNS", "100")
    _, out, _ = _run(argv, capsys)
    lines = _lines(out)
    assert all(len(line) <= 100 and line == line.rstrip() for line in lines[1:-1])
    assert len(lines) == 3 + 56  # a title, a header, a row per owned key (never broken), the total
    assert any("…" in line for line in lines)
    _, wide, _ = _run([*argv, "--wide"], capsys)
    assert not any("…" in line for line in _lines(wide))
    monkeypatch.setenv("COLUMNS", "80")
    _, out, _ = _run(["rules", "list"], capsys)
    assert len(_lines(out)) == 1 + len(builtin_names()) and all(len(line) <= 80 for line in _lines(out))
    monkeypatch.delenv("COLUMNS")
    _, out, _ = _run(argv, capsys)
    assert not any("…" in line for line in _lines(out))  # piped, no COLUMNS: nothing cut


def test_plans_show_experts_and_shares_that_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    """before: shares were of the checkpoint (adding up to more than 100% with replicated keys), and there was
    no experts column."""
    _, out, _ = _run(["plan", str(BASE), "--mesh", "ep=2,tp=2", "--all-ranks"], capsys)
    lines = _lines(out)
    assert lines[1].split() == ["rank", "coords", "keys", "bytes", "share", "experts"]
    rows = [line.split() for line in lines[2:6]]
    assert [row[-1] for row in rows] == ["0-2", "0-2", "3-5", "3-5"]
    assert abs(sum(float(row[-2].rstrip("%")) for row in rows) - 100) < 0.5


def test_human_outputs_use_binary_units(capsys: pytest.CaptureFixture[str]) -> None:
    """before: lint printed raw byte counts."""
    _, out, _ = _run(["lint", str(BASE), "--mesh", "ep=2"], capsys)
    assert "info byte-balance: bytes per rank: max 112.2 KiB on rank 0, mean 112.2 KiB" in out


# Messages that say how to fix.


def test_a_misspelled_ruleset_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    """before: no did-you-mean."""
    with pytest.raises(RulesetError) as info:
        load_ruleset("transformer-moe")
    assert (
        info.value.fix
        == "did you mean 'transformers-moe'? Else run `ownership rules list`, or pass a file path"
    )


def test_a_misspelled_field_names_itself_and_every_other_problem() -> None:
    """before: a typo `ovr` for `over` gave "missing 'over' (and 5 more problems)" without naming `ovr` or the
    other five."""
    text = (
        'name = "x"\naxes = ["ep"]\n[params.num_experts]\n[[rule]]\nid = "r"\nmatch = "**.experts.<e>.**"\n'
        'place = { e = { ovr = "ep", size = "num_experts", strategy = 3 } }\n'
    )
    with pytest.raises(RulesetError) as info:
        ownership.Ruleset.from_text(text, source="x.toml")
    assert str(info.value) == (
        "x.toml: rule 'r': unknown field 'place.e.ovr' (and 2 more problems): found 'ovr', expected one of: align, "
        "extra, heads, over, pad, parts, size, sizes, strategy, table, uneven. Fix: correct its spelling (did you mean 'over'?)\n"
        "    also: rule 'r': missing field 'place.e.over'\n"
        "    also: rule 'r': Input should be a valid string 'place.e.strategy'"
    )


def test_a_param_outside_its_choices_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    """before: "pass --param expert_strategy=<one of those>"."""
    status, _, err = _run(
        [
            "explain",
            "vllm-ep-lora",
            "m.experts.1.w",
            "--mesh",
            "ep=2",
            "--param",
            "num_experts=4",
            "--param",
            "expert_strategy=striped",
        ],
        capsys,
    )
    assert status == 2
    assert err.rstrip().endswith(
        "Fix: pass --param expert_strategy=VALUE with one of linear, round_robin, table, vllm_contiguous"
    )


def test_header_only_commands_never_import_torch(tmp_path: Path) -> None:
    """before: every command that opened a checkpoint spent 3-4 s importing torch."""
    script = (
        "import sys\n"
        "from ownership.cli import main\n"
        f"assert main(['plan', {str(ADAPTER)!r}, '--config', {str(CONFIG)!r}, '--mesh', 'ep=2', '--all-ranks']) == 0\n"
        f"assert main(['lint', {str(BASE)!r}, '--mesh', 'ep=2,tp=2']) == 0\n"
        f"assert main(['explain', 'auto', 'model.norm.weight', '--checkpoint', {str(BASE)!r}, '--mesh', 'ep=2']) == 0\n"
        "assert main(['rules', 'show', 'llama']) == 0\n"
        "assert main(['schema']) == 0\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]"
