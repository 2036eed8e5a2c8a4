"""Every code block of README.md and docs/*.md is run, so the documentation cannot rot.

- ``python`` blocks run as scripts in a scratch folder that sees the repository's data/ and
  recipes/; a block whose first line is ``# name.py`` is written as that file instead (a module
  the following blocks import, as the "write your own loss" example).
- ``yaml`` blocks are recipes or recipe fragments: resolved by the CLI as an overlay on
  recipes/base.yaml (``--print_config``), so every key must exist and every value parse.
- ``bash`` blocks: each ``dpo-lightning fit / validate`` command is resolved by the CLI with
  ``--print_config`` (training runs are the recipe tests' job), also when a cluster launcher
  (``srun``, ``torchrun``) starts it; other console scripts and
  Python scripts answer ``--help``; a ``make`` target must exist (``make -n``); ``pip install``
  extras must be defined in pyproject.toml.
- Blocks without a language are printed output or a file tree: nothing to run.

The five-line example's own test also checks what it writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONSOLE_SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def code_blocks(document: Path) -> list[Block]:
    """The fenced blocks of ``document`` with their language and first line number."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(document.read_text().splitlines(), 1):
        if line.startswith("```") and language is None:
            language, start, lines = line[3:].strip(), number, []
        elif line.startswith("```"):
            blocks.append(Block(document, start, language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{document}: a code block opened at line {start} is never closed"
    return blocks


ALL_BLOCKS = [b for d in DOCUMENTS for b in code_blocks(d)]


def blocks_of(language: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.language == language]


def test_every_block_has_a_known_language() -> None:
    assert {b.language for b in ALL_BLOCKS} <= {"", "python", "yaml", "bash"}
    assert len(blocks_of("python")) >= 3 and len(blocks_of("bash")) >= 6 and len(blocks_of("yaml")) >= 2


# -- python ---------------------------------------------------------------------------------------
@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A folder where ``data/`` and ``recipes/`` are the repository's, as from its root."""
    for name in ("data", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def run_python(block: Block, folder: Path) -> subprocess.CompletedProcess:
    path = folder / f"block_{block.line}.py"
    path.write_text(block.code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(folder)}
    return subprocess.run([sys.executable, path.name], cwd=folder, capture_output=True, text=True, env=env, timeout=900)


def module_file(block: Block) -> str | None:
    """``name.py`` when the block's first line is ``# name.py`` (a module, written not run)."""
    match = re.match(r"# (\w+\.py)\s*$", block.code.splitlines()[0])
    return match.group(1) if match else None


FIVE_LINES = next(b for b in blocks_of("python") if b.document.name == "README.md")


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in blocks_of("python") if b is not FIVE_LINES and not module_file(b)],
                         ids=lambda b: b.name)
def test_python_block_runs(block: Block, scratch: Path) -> None:
    out = run_python(block, scratch)
    assert out.returncode == 0, f"{block.name}:\n{out.stderr[-3000:]}"


@pytest.mark.slow
def test_the_five_line_example_trains_and_exports(scratch: Path) -> None:
    assert len([line for line in FIVE_LINES.code.splitlines() if line.strip()]) <= 5
    out = run_python(FIVE_LINES, scratch)
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy = float(out.stdout.strip().splitlines()[-1])
    assert 0.9 <= accuracy <= 1.0  # the quickstart pairs are separable: 1.00 after an epoch (make demo)
    policy = scratch / "outputs" / "python" / "policy"
    assert (policy / "model.safetensors").is_file()
    recorded = json.loads((policy / "reference.json").read_text())["reference_model"]
    assert recorded["name_or_path"] == str((ROOT / "data" / "tiny-llama").resolve())
    assert list((scratch / "outputs" / "python" / "logs").rglob("metrics.csv"))


@pytest.mark.parametrize("block", [b for b in blocks_of("python") if module_file(b)], ids=lambda b: b.name)
def test_python_module_block_imports(block: Block, tmp_path: Path) -> None:
    (tmp_path / module_file(block)).write_text(block.code)
    out = subprocess.run([sys.executable, "-c", f"import {module_file(block)[:-3]}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# -- yaml -----------------------------------------------------------------------------------------
def resolve(args: list[str], extra_path: Path | None = None) -> str:
    """``dpo-lightning <args> --print_config`` in this process, from the repository root: the
    printed config (a parse error fails the test with the CLI's one-line message)."""
    from dpo_lightning.cli import run

    buffer = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    if extra_path is not None:
        sys.path.insert(0, str(extra_path))
    try:
        with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit_info:
            run([*args, "--print_config"], exit_on_error=False)
    finally:
        os.chdir(cwd)
        if extra_path is not None:
            sys.path.remove(str(extra_path))
    assert exit_info.value.code in (0, None), args
    return buffer.getvalue()


@pytest.mark.parametrize("block", blocks_of("yaml"), ids=lambda b: b.name)
def test_yaml_block_resolves_as_a_recipe(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "block.yaml"
    path.write_text(block.code)
    printed = resolve(["fit", "--config", str(ROOT / "recipes" / "base.yaml"), "--config", str(path)])
    assert "model:" in printed and "trainer:" in printed


# -- bash -----------------------------------------------------------------------------------------
def commands(block: Block) -> list[list[str]]:
    """The block's command lines (continuations joined, comments dropped), split as a shell would."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


#: launchers that start a dpo-lightning command on a cluster (the command after them is checked)
LAUNCHERS = ("srun", "torchrun")


def launched_command(command: list[str]) -> list[str]:
    """The dpo-lightning command a launcher line starts (``srun dpo-lightning fit ...``,
    ``torchrun ... -m dpo_lightning.cli fit ...``), as ``["dpo-lightning", "fit", ...]``;
    other commands as they are."""
    if Path(command[0]).name not in LAUNCHERS:
        return command
    for i, token in enumerate(command):
        if Path(token).name == "dpo-lightning":
            return command[i:]
        if token == "-m" and i + 1 < len(command) and command[i + 1] == "dpo_lightning.cli":
            return ["dpo-lightning", *command[i + 2:]]
    pytest.fail(f"{' '.join(command)!r}: a launcher line that starts no dpo-lightning command")


BASH = [(b, i, c) for b in blocks_of("bash") for i, c in enumerate(commands(b))]


@pytest.mark.parametrize(("block", "index", "command"), BASH, ids=[f"{b.name}#{i}" for b, i, _ in BASH])
def test_bash_command_is_accepted(block: Block, index: int, command: list[str], tmp_path: Path) -> None:
    env_path = None
    while command and re.match(r"^[A-Z_]+=", command[0]):  # VAR=value prefixes
        if command[0].startswith("PYTHONPATH="):
            env_path = tmp_path
            for module in (b for b in blocks_of("python") if b.document == block.document and module_file(b)):
                (tmp_path / module_file(module)).write_text(module.code)
        command = command[1:]
    command = launched_command(command)
    program = Path(command[0]).name
    if program == "dpo-lightning":
        subcommand = command[1]
        if subcommand in ("fit", "validate") and "--help" not in command and "-h" not in command \
                and not any(a.endswith(".help") for a in command):
            assert resolve(command[1:], env_path)
            return
        out = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", *command[1:]], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    elif program in CONSOLE_SCRIPTS:
        module, function = CONSOLE_SCRIPTS[program].split(":")
        out = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[1:] = ['--help']; "
                              f"from {module} import {function}; {function}()"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-2000:]
    elif program == "make":
        for target in command[1:]:
            out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"make target {target!r}: {out.stderr}"
    elif program == "python" and command[1].endswith(".py"):
        out = subprocess.run([sys.executable, command[1], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-2000:]
    elif program == "pip" and command[1] == "install":
        for spec in command[2:]:
            extras = re.findall(r"\[([^\]]+)\]", spec)
            for extra in (e for group in extras for e in group.split(",")):
                assert extra in EXTRAS, f"{block.name}: extra {extra!r} is not in pyproject.toml"
    else:
        pytest.fail(f"{block.name}: no check for the command {' '.join(command)!r}; teach tests/test_docs.py one")
