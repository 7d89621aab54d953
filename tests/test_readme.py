"""The README shows the commands that work: every file it names exists, every `honeybee-*` command it shows is a
console script whose parser knows each flag the README passes it, and every Python block compiles."""

import configparser
import importlib
import re
import shlex

import pytest

from utils import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _console_scripts():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def _commands():
    """(command name, subcommand or None, flags) for every command of ours in the README's shell blocks."""
    scripts, commands = _console_scripts(), []
    for language, block in BLOCKS:
        if language != "bash":
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                name = word.rsplit("/", 1)[-1]
                if name in scripts:
                    rest = words[i + 1 :]
                    sub = rest[0] if rest and rest[0] in ("merge", "config") else None
                    commands.append((name, sub, [w.split("=")[0] for w in rest if w.startswith("--")]))
                    break
    return commands


def test_it_shows_every_console_script():
    assert {name for name, _, _ in _commands()} == set(_console_scripts())


def test_named_files_exist():
    named = set(re.findall(r"\b(?:scripts|examples|benchmarks|tests|hub|train|assets)/[\w./*-]*\w", README))
    assert named, "the README names no file"
    missing = sorted(path for path in named if not any(REPO.glob(path)))
    assert not missing, missing


@pytest.mark.parametrize("name, sub, flags", _commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_commands_and_their_flags_exist(name, sub, flags, capsys):
    module, function = _console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), function)
    if sub == "config":
        assert main(["config", "--help"]) == 2  # `config NAME` takes no flags: its usage is the help
        return
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"] if sub else ["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    unknown = [flag for flag in flags if flag not in help_text]
    assert not unknown, f"{name} {sub or ''}: the README passes {unknown}, which its --help does not list"


def test_python_blocks_compile():
    python = [block for language, block in BLOCKS if language == "python"]
    assert python
    for block in python:
        compile(block, "README.md", "exec")
