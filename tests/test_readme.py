"""The README's examples run as they are: its Python block as a doctest, and every command of its shell blocks
(but the set-up ones, `make ...`) with exit status 0, from a folder that holds what the repository's root holds."""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import shlex
from pathlib import Path

import pytest

from ownership.cli import main
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands() -> list[str]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("ownership "):
                commands.append(line)
    return commands


@pytest.fixture
def repository_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("tests", "examples", "rules", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_python_example(repository_root: Path) -> None:
    test = doctest.DocTestParser().get_doctest(README, {}, "README.md", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    output = io.StringIO()
    runner.run(test, out=output.write)
    assert runner.failures == 0, output.getvalue()
    assert runner.tries >= 8


@pytest.mark.parametrize("command", _commands())
def test_every_command(command: str, repository_root: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(shlex.split(command)[1:])
    assert status == 0, f"{command}\n{err.getvalue()}"
    assert out.getvalue()
