"""``dpo-lightning [SUBCOMMAND] --help`` is served from a cache after its first run: the same bytes,
without importing Lightning, and a new text whenever anything it is made from changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dpo_lightning import help_cache

SCRIPT = Path(sys.executable).parent / "dpo-lightning"


def dpo_lightning(*args: str, cache: Path, command: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DPO_LIGHTNING_")}
    environment.update(DPO_LIGHTNING_CACHE_DIR=str(cache), COLUMNS="100", **env)
    return subprocess.run([*(command or [sys.executable, "-m", "dpo_lightning"]), *args], capture_output=True,
                          text=True, cwd=ROOT, env=environment, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``fit --help`` run once into an empty cache: the CLI builds the text and saves it."""
    cache = tmp_path_factory.mktemp("help-cache")
    first = dpo_lightning("fit", "--help", cache=cache)
    assert first.returncode == 0, first.stderr
    return cache, first


def test_first_help_is_saved_and_the_second_prints_the_same_bytes(built) -> None:
    cache, first = built
    assert first.stdout.startswith("usage: dpo-lightning [options] fit") and "--model" in first.stdout
    assert len(list((cache / "help").glob("*.txt"))) == 1
    second = dpo_lightning("fit", "--help", cache=cache)
    assert second.returncode == 0 and second.stderr == ""
    assert second.stdout == first.stdout


def test_the_cached_text_equals_the_one_the_cli_builds_with_the_cache_off(built, tmp_path) -> None:
    cache, first = built
    uncached = dpo_lightning("fit", "--help", cache=tmp_path, DPO_LIGHTNING_HELP_CACHE="0")
    assert uncached.returncode == 0 and uncached.stdout == first.stdout
    assert not (tmp_path / "help").exists()  # nothing written with the cache off


def test_a_cached_help_imports_neither_lightning_nor_torch(built) -> None:
    cache, first = built
    code = ("import sys; sys.argv = ['dpo-lightning', 'fit', '--help']\n"
            "from dpo_lightning.help_cache import main; main()\n"
            "print(sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules), file=sys.stderr)")
    out = dpo_lightning(cache=cache, command=[sys.executable, "-c", code])
    assert out.returncode == 0
    assert out.stdout == first.stdout
    assert out.stderr.strip() == "[]"


def test_the_console_script_is_the_caching_entry(tmp_path, monkeypatch) -> None:
    # a text saved under the key the script computes is what the script prints: it read the cache
    monkeypatch.setenv("DPO_LIGHTNING_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", ["dpo-lightning", "fit", "--help"])
    for name in [k for k in os.environ if k.startswith("JSONARGPARSE_")]:
        monkeypatch.delenv(name)
    help_cache.store_help(["fit", "--help"], "saved help text\n")
    out = dpo_lightning("fit", "--help", cache=tmp_path, command=[str(SCRIPT)])
    assert out.returncode == 0 and out.stdout == "saved help text\n"


def test_a_failed_help_request_saves_nothing(tmp_path) -> None:
    out = dpo_lightning("fitt", "--help", cache=tmp_path)
    assert out.returncode != 0
    assert not list(tmp_path.rglob("*.txt"))


@pytest.mark.parametrize("args", [["fit", "--help"], ["--help"], ["validate", "-h"]])
def test_plain_help_requests_are_cacheable(args, monkeypatch) -> None:
    for name in ("DPO_LIGHTNING_VERBOSE", "DPO_LIGHTNING_DEBUG", "DPO_LIGHTNING_HELP_CACHE"):
        monkeypatch.delenv(name, raising=False)
    assert help_cache.cacheable(args)


@pytest.mark.parametrize("args, env", [
    ([], {}),
    (["fit"], {}),
    (["fit", "--config", "recipes/dpo.yaml", "--help"], {}),  # a recipe changes the defaults shown
    (["fit", "--verbose", "--help"], {}),
    (["fit", "--help"], {"DPO_LIGHTNING_VERBOSE": "1"}),
    (["fit", "--help"], {"DPO_LIGHTNING_DEBUG": "1"}),
    (["fit", "--help"], {"DPO_LIGHTNING_HELP_CACHE": "0"}),
])
def test_other_commands_run_the_cli(args, env, monkeypatch) -> None:
    for name in ("DPO_LIGHTNING_VERBOSE", "DPO_LIGHTNING_DEBUG", "DPO_LIGHTNING_HELP_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not help_cache.cacheable(args)


def test_the_key_changes_with_each_thing_the_text_is_made_from(tmp_path, monkeypatch) -> None:
    source = tmp_path / "pkg"
    source.mkdir()
    (source / "cli.py").write_text("x = 1\n")
    monkeypatch.setattr(help_cache, "PACKAGE_DIR", source)
    monkeypatch.delenv("JSONARGPARSE_DEFAULT_ENV", raising=False)
    base = help_cache.help_key(["fit", "--help"])
    assert help_cache.help_key(["fit", "--help"]) == base  # stable
    keys = {base, help_cache.help_key(["validate", "--help"])}

    os.utime(source / "cli.py", ns=(1, 1))  # an edit or a checkout
    keys.add(help_cache.help_key(["fit", "--help"]))
    (source / "new_loss.py").write_text("")  # a new module
    keys.add(help_cache.help_key(["fit", "--help"]))
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")  # jsonargparse shows ENV: lines then
    keys.add(help_cache.help_key(["fit", "--help"]))
    monkeypatch.setattr(help_cache, "_installed", lambda name: "99.0" if name == "lightning" else "1.0")  # an upgrade
    keys.add(help_cache.help_key(["fit", "--help"]))
    monkeypatch.setattr(sys, "argv", ["other-name", "fit", "--help"])  # usage: names the program
    keys.add(help_cache.help_key(["fit", "--help"]))
    assert len(keys) == 7


def test_an_unwritable_cache_folder_is_skipped(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DPO_LIGHTNING_CACHE_DIR", str(blocker))  # help/ cannot be made under a file
    help_cache.store_help(["fit", "--help"], "text")
    assert help_cache.cached_help(["fit", "--help"]) is None
    assert blocker.read_text() == ""
