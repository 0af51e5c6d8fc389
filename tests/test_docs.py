"""Every command README.md, docs/ and configs/README.md show parses: each of our entry scripts and
modules named in a shell block or an inline command is run through its own argument parser (and,
for the settings-table scripts, the YAML recipes it names and the range checks), and every Python
block compiles. Launchers (mpirun, msrun, srun) and continuation lines are taken apart as a shell
would; `...` stands for flags the reader adds and `<...>` for a value of theirs."""
from __future__ import annotations

import importlib
import os
import re
import shlex

import pytest

import config
from tests.helpers import ROOT

PAGES = ["README.md", "configs/README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
SETTINGS_SCRIPTS = {"train.py", "validate.py", "eval.py", "infer.py", "export.py", "average.py"}
PARSERS = {  # our other commands: where their parser is built
    "benchmark.py": ("benchmark", "build_parser"),
    "-m models": ("models.__main__", "build_parser"),
    "-m models.convert": ("models.convert", "build_parser"),
    "-m resgarden.check": ("resgarden.check.__main__", "parse_args"),
}
FOREIGN = ("sudo", "apt-get", "pip", ".venv-torch/bin/pip", ".", "lint-imports", "export", "cd")
A_RECIPE = "configs/res2net/res2net50_gpu.yaml"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(r"^```" + language + r"\n(.*?)^```", text, flags=re.M | re.S)


def _shell_lines(text: str) -> list[tuple[str, bool]]:
    """(command line, whether it stands in a block) for the ```bash blocks (continuations joined),
    the `$ ` lines of plain blocks and the inline code spans that start with a command."""
    lines = []
    for block in _blocks(text, "bash"):
        lines += [(line, True) for line in block.replace("\\\n", " ").splitlines()]
    for block in _blocks(text, ""):
        lines += [(line[2:], True) for line in block.splitlines() if line.startswith("$ ")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    lines += [(span, False) for span in re.findall(r"`([^`\n]+)`", prose)
              if re.match(r"(python3? |mpirun |msrun |srun )", span) and "[" not in span]
    return lines


def _commands(line: str) -> list[list[str]]:
    line = re.sub(r"(configs/<family>/)?<recipe>(\.yaml)?", A_RECIPE, line)
    line = re.sub(r"<[^<>]*>", "VALUE", line)
    line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
    commands = []
    for part in line.split("&&"):
        words = [w for w in shlex.split(part) if w != "..."]
        if words:
            commands.append(words)
    return commands


def _ours(words: list[str]) -> tuple[str, list[str]] | None:
    """(script or '-m module', its arguments) for a command that runs ours, else None."""
    for i, word in enumerate(words):
        if word in ("python", "python3") and words[i + 1:i + 2] == ["-m"]:
            return "-m " + words[i + 2], words[i + 3:]
        if word.endswith(".py") and not word.startswith("-"):
            return os.path.basename(word), words[i + 1:]
    return None


def _collect() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
            text = handle.read()
        for line, in_block in _shell_lines(text):
            for words in _commands(line):
                ours = _ours(words)
                if ours is None:
                    assert not in_block or words[0] in FOREIGN or words[0] in ("mpirun", "msrun", "srun") and "..." in line, (
                        f"{page}: a command this test does not know: {' '.join(words)}")
                    continue
                if ours[0] in ("-m venv", "-m pytest") or not (in_block or ours[1]):
                    continue  # not ours, or a command named in prose without arguments
                found.append((page, *ours))
    return found


COMMANDS = _collect()


def test_the_pages_show_every_user_command():
    shown = {(script, " ".join(args)) for _, script, args in COMMANDS}
    wanted = [
        ("train.py", "--model=res2net50 --pretrained --opt=momentum --lr=0.001 --dataset=cifar10 --num_classes=10 --dataset_download"),
        ("train.py", "--model=res2net50 --pretrained --opt=momentum --lr=0.001 dataset=cifar10 --num_classes=10 --dataset_download"),
        ("validate.py", "--model=res2net50 --dataset=imagenet --val_split=val --pretrained"),
        ("validate.py", "--model=res2net50 --dataset=imagenet --val_split=val --ckpt_path=./ckpt/res2net50-best.ckpt"),
        ("train.py", "--run_distribute=0 --device_target=CPU --data_path=/path/to/imagenet/train --output_path /path/to/checkpoint"),
        ("eval.py", "--data_path=/path/to/imagenet/val --device_target=CPU --checkpoint_file_path=/path/to/checkpoint/VALUE/ckpt_0/"),
    ]
    for command in wanted:
        assert command in shown, f"README lost the user command: python {' '.join(command)}"
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("page, script, args", COMMANDS, ids=[f"{p}: {s} {' '.join(a)}"[:90] for p, s, a in COMMANDS])
def test_every_command_shown_parses(page, script, args, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes are named from the repository root
    if "--help" in args:
        with pytest.raises(SystemExit) as ended:
            _parse(page, script, args)
        assert ended.value.code == 0
    else:
        _parse(page, script, args)


def _parse(page: str, script: str, args: list[str]) -> None:
    if script in SETTINGS_SCRIPTS:
        config.parse_config(args, prog=script)
        return
    assert script in PARSERS, f"{page} shows {script}, which this test cannot parse: add it to PARSERS"
    module, function = PARSERS[script]
    build = getattr(importlib.import_module(module), function)
    if function == "build_parser":
        build().parse_args(args)
    else:
        build(args)


def test_the_readme_zoo_table_is_the_cards():
    import models

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        assert models.zoo_table() in handle.read(), "README's zoo table is stale: paste models.zoo_table()"


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_compiles(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
        for block in _blocks(handle.read(), "python"):
            compile(block, page, "exec")


@pytest.mark.parametrize("page", PAGES)
def test_every_file_the_pages_name_exists(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
        named = set(re.findall(r"\b((?:resgarden|models|tests|configs|docs)/[\w./-]+\.(?:py|cc|h|yaml|md|tsv))\b",
                               handle.read()))
    base = ROOT if page == "README.md" or page.startswith("docs") else os.path.join(ROOT, os.path.dirname(page))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p))
                     and not os.path.exists(os.path.join(base, p)))
    assert not missing, f"{page} names files that do not exist: {missing}"
