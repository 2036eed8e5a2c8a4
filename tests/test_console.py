"""Quiet by default: no library notice, tip, deprecation or progress bar the user did not ask for,
from the console script and the Python API alike; ``--verbose`` / ``DPO_LIGHTNING_VERBOSE=1``
bring them back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = Path(sys.executable).parent / "dpo-lightning"
#: what each kind of library noise starts with or contains
NOISE = ("bitsandbytes", "kernels-community", "Tip:", "deprecated", "GPU available", "tensorboardX", "Loading weights")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DPO_LIGHTNING_VERBOSE", "TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env.update({"HF_HUB_OFFLINE": "1", **extra})
    return env


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=environment(**env), timeout=300)


def noise_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in NOISE)]


def test_fit_help_prints_no_library_notice(tmp_path: Path) -> None:
    # an empty help cache: the CLI builds the text (a cached one would print without importing anything)
    out = subprocess.run([str(SCRIPT), "fit", "--help"], capture_output=True, text=True, cwd=ROOT,
                         env=environment(DPO_LIGHTNING_CACHE_DIR=str(tmp_path)), timeout=300)
    assert out.returncode == 0 and "--model" in out.stdout
    assert noise_lines(out.stderr) == []
    assert out.stderr == ""


TRAINER_AND_MODEL = """
import lightning as L
import dpo_lightning
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer
spec = ModelSpec(name_or_path="data/tiny-llama")
load_causal_lm(spec, load_tokenizer(spec))
L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
"""


def test_python_api_is_quiet_and_verbose_brings_the_notices_back() -> None:
    quiet = python(TRAINER_AND_MODEL)
    assert quiet.returncode == 0, quiet.stderr
    assert noise_lines(quiet.stderr) == []
    loud = python(TRAINER_AND_MODEL, DPO_LIGHTNING_VERBOSE="1")
    assert loud.returncode == 0, loud.stderr
    assert "GPU available" in loud.stderr and "Tip:" in loud.stderr


def test_verbose_libraries_undoes_quiet_in_the_same_process() -> None:
    code = TRAINER_AND_MODEL.replace("import dpo_lightning\n", "import dpo_lightning\ndpo_lightning.console.verbose_libraries()\n")
    out = python(code)
    assert out.returncode == 0, out.stderr
    assert "GPU available" in out.stderr and "Loading weights" in out.stderr


def test_importing_the_8bit_optimizer_prints_no_hub_kernel_notice() -> None:
    code = "import dpo_lightning, bitsandbytes.optim; print(bitsandbytes.optim.AdamW8bit.__name__)"
    quiet = python(code)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "AdamW8bit", quiet.stderr
    assert noise_lines(quiet.stderr) == []
    probe = python("from bitsandbytes.functional import has_avx512bf16; "
                   "print(bool(has_avx512bf16()))")
    if probe.stdout.strip().splitlines()[-1:] != ["True"]:
        pytest.skip("bitsandbytes only looks for the hub kernel on CPUs with AVX512-BF16")
    loud = python(code, DPO_LIGHTNING_VERBOSE="1")
    assert "kernels-community" in loud.stderr


def test_a_real_warning_about_the_run_still_shows(tmp_path: Path) -> None:
    """Quiet drops library noise only: a UserWarning raised for the run reaches the user."""
    out = python("import warnings, dpo_lightning; warnings.warn('max_length 8 cuts every completion')")
    assert "max_length 8 cuts every completion" in out.stderr
