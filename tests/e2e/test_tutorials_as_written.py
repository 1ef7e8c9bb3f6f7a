"""The tutorials run as written: every command line they show, run from a fresh folder as their prose says (the
files they tell the reader to save saved from their own blocks), succeeds and prints what they show.

A tutorial says what to save with a comment beside its prose: `<!-- save PATH: TITLE; TITLE -->` writes the
```toml blocks whose first lines are `# TITLE`, in that order, to PATH. Shown output is compared line by line,
in order, with runs of spaces and timings ignored; `...` stands for lines left out.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from ownership.cli import main
from tests.conftest import ROOT

TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
_BLOCK = re.compile(
    r"```toml\n# (?P<title>[^\n]*)\n(?P<body>.*?)```|<!-- save (?P<path>[^:]+): (?P<titles>.*?) -->|```console\n(?P<console>.*?)```",
    re.S,
)


def _steps(text: str) -> list[tuple[str, object]]:
    blocks: dict[str, str] = {}
    steps: list[tuple[str, object]] = []
    for m in _BLOCK.finditer(text):
        if m.group("title") is not None:
            blocks[m.group("title")] = f"# {m.group('title')}\n{m.group('body')}"
        elif m.group("path") is not None:
            titles = [t.strip() for t in m.group("titles").split(";")]
            steps.append(("save", (m.group("path"), "".join(blocks[t] for t in titles))))
        else:
            steps.extend(("run", command) for command in _commands(m.group("console")))
    return steps


def _commands(console: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) of a console block."""
    out: list[tuple[str, list[str]]] = []
    lines = console.rstrip("\n").split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        i += 1
        shown = []
        while i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i])
            i += 1
        out.append((command, shown))
    return out


def _normal(line: str) -> str:
    return re.sub(r"\d+\.\d+ s\b", "N s", " ".join(line.split()))


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.name)
def test_every_command_line_runs_as_shown(
    tutorial: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _steps(tutorial.read_text(encoding="utf-8"))
    assert any(kind == "run" for kind, _ in steps)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    for kind, step in steps:
        if kind == "save":
            path, text = step  # type: ignore[misc]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            continue
        command, shown = step  # type: ignore[misc]
        argv = shlex.split(command)
        assert argv[0] == "ownership", command
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(argv[1:])
        assert status == 0, f"{command}\n{stderr.getvalue()}"
        printed = [_normal(line) for line in stdout.getvalue().splitlines()]
        position = 0
        for line in shown:
            if line.strip() == "...":
                continue
            wanted = _normal(line)
            assert wanted in printed[position:], f"{command}: {line!r} not printed (after line {position})"
            position = printed.index(wanted, position) + 1
