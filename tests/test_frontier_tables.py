"""The sentiment experiment's tables are written from its CSV files into marked regions of
docs/frontier.md and README.md (scripts/frontier_tables.py), and the shipped ones match the
shipped CSV files."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import frontier_tables  # noqa: E402

SUMMARY = [
    {"series": "SFT", "label": "SFT", "beta": "", "seeds": 5, "reward": 0.5, "reward_se": 0.002, "kl": 0.0, "kl_se": 0.0},
    {"series": "DPO", "label": "DPO beta=1.0", "beta": 1.0, "seeds": 5, "reward": 0.79, "reward_se": 0.002, "kl": 1.13,
     "kl_se": 0.04, "regret": 0.143, "kl_efficiency": 0.4},
    {"series": "DPO, Bradley-Terry labels", "label": "DPO, Bradley-Terry labels beta=0.5", "beta": 0.5, "seeds": 5,
     "reward": 0.765, "reward_se": 0.002, "kl": 1.54, "kl_se": 0.07, "regret": 0.219, "kl_efficiency": 0.24,
     "optimum_beta": 0.125, "optimum_reward": 0.959, "optimum_kl": 1.32},
    {"series": "online DPO", "label": "online DPO beta=1.0", "beta": 1.0, "seeds": 5, "reward": 0.841, "kl": 3.36,
     "regret": 0.159, "kl_efficiency": 0.19},
]
BEST_OF = [{"n": 1, "reward": 0.5, "kl": 0.0}, {"n": 8, "reward": 0.925, "kl": 1.11}, {"n": 64, "reward": 1.0, "kl": 1.7}]
KL_SPLIT = [{"label": "DPO beta=1.0", "kl_other": 0.41, "kl_eos": 0.01}]


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def test_results_table_has_a_row_per_run_with_its_values() -> None:
    lines = frontier_tables.results_table(SUMMARY, BEST_OF, KL_SPLIT).splitlines()
    assert lines[0].startswith("| run (5 seeds) |")
    body = lines[2:]
    assert body[0] == "| SFT | 0.500 ± 0.002 | 0 | | | | |"
    assert body[1] == "| best-of-8 from SFT (exact KL) | 0.925 | 1.11 | | | | |"  # n 1 and 64 are not shown
    assert body[2] == "| DPO β 1.0 | 0.790 ± 0.002 | 1.13 ± 0.04 | 0.143 | 0.40 |  | 0.42 |"  # 0.41 + 0.01 off sentiment
    assert body[3] == "| DPO, Bradley-Terry labels β 0.5 | 0.765 ± 0.002 | 1.54 ± 0.07 | 0.219 | 0.24 | βτ 0.125: 0.959, 1.32 |  |"
    assert body[4].startswith("| online DPO as shipped, β 1.0 | 0.841 | 3.36 | 0.159 |")
    assert len(body) == 5


def test_a_run_on_fewer_seeds_says_so_and_gamma_is_written_as_such() -> None:
    one_seed = {"series": "SimPO, Bradley-Terry labels", "label": "SimPO, Bradley-Terry labels beta=2.0 gamma=1.0",
                "beta": 2.0, "seeds": 1, "reward": 0.9, "reward_se": 0.004, "kl": 2.0, "kl_se": 0.03, "regret": 0.05,
                "kl_efficiency": 0.5, "optimum_beta": 0.25, "optimum_reward": 0.832, "optimum_kl": 0.61}
    body = frontier_tables.results_table(SUMMARY + [one_seed, {**one_seed, "seeds": 3}], BEST_OF, KL_SPLIT).splitlines()[2:]
    assert body[-2] == ("| SimPO, Bradley-Terry labels β 2.0, γ 1.0 (1 seed; ± the evaluation's) | 0.900 ± 0.004 | "
                        "2.00 ± 0.03 | 0.050 | 0.50 | βτ 0.25: 0.832, 0.61 |  |")
    assert body[-1].startswith("| SimPO, Bradley-Terry labels β 2.0, γ 1.0 (3 seeds) | 0.900 ± 0.004 |")
    assert body[2] == "| DPO β 1.0 | 0.790 ± 0.002 | 1.13 ± 0.04 | 0.143 | 0.40 |  | 0.42 |"  # as many seeds as the header


def test_regret_table_keeps_the_readme_runs_in_order_and_skips_missing_ones() -> None:
    table = frontier_tables.regret_table(SUMMARY, BEST_OF, runs=["online DPO beta=1.0", "not run", "DPO beta=1.0"])
    assert table.splitlines()[2:] == [
        "| best-of-8 from the SFT model (exact KL) | 0.925 | 1.11 | |",
        "| online DPO as shipped, β 1.0 | 0.841 | 3.36 | 0.159 |",
        "| DPO β 1.0 | 0.790 | 1.13 | 0.143 |",
    ]


def test_replace_region_rewrites_only_the_region_and_is_idempotent(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- generated: results (x) -->\nold\ntable\n<!-- end: results -->\nafter\n")
    for _ in range(2):
        frontier_tables.replace_region(page, "results", "| new |")
        assert page.read_text() == "before\n<!-- generated: results (x) -->\n| new |\n<!-- end: results -->\nafter\n"


def test_a_page_without_the_region_is_refused_naming_the_marker_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    with pytest.raises(ValueError, match=r"no region 'regret'.*<!-- generated: regret .*<!-- end: regret -->"):
        frontier_tables.replace_region(page, "regret", "x")
    assert page.read_text() == "no markers here\n"


def test_write_tables_from_csv_files(tmp_path: Path) -> None:
    write_csv(tmp_path / "frontier.csv", SUMMARY)
    write_csv(tmp_path / "frontier_best_of_n.csv", BEST_OF)
    (tmp_path / "frontier_timing.json").write_text(json.dumps(
        {"total": {"wall_s": 1500.0, "cpu_s": 3000.0}, "jobs": 2, "quiet_estimate_s": 1560.0}))
    md, readme = tmp_path / "frontier.md", tmp_path / "README.md"
    md.write_text("<!-- generated: timing (s) -->\n<!-- end: timing -->\n<!-- generated: results (s) -->\n<!-- end: results -->\n")
    readme.write_text("<!-- generated: regret (s) -->\n<!-- end: regret -->\n<!-- generated: timing (s) -->\n<!-- end: timing -->\n")
    frontier_tables.write_tables(tmp_path, md, readme)
    assert "| DPO, Bradley-Terry labels β 0.5 | 0.765 ± 0.002 |" in md.read_text()
    assert "| DPO β 1.0 | 0.790 | 1.13 | 0.143 |" in readme.read_text()
    for page in (md, readme):
        assert "took 25.0 minutes of wall time with 2 workers (3000 CPU seconds" in page.read_text()
        assert "26.0 minutes" in page.read_text()


def test_the_shipped_tables_are_the_ones_the_shipped_csv_files_give(tmp_path: Path) -> None:
    """docs/frontier.md and README.md hold what `make experiment` wrote: regenerating them from
    docs/*.csv changes nothing (a table edited by hand, or CSV files from another run, fail)."""
    md, readme = (Path(shutil.copy(ROOT / f, tmp_path / Path(f).name)) for f in ("docs/frontier.md", "README.md"))
    frontier_tables.write_tables(ROOT / "docs", md, readme)
    assert md.read_text() == (ROOT / "docs" / "frontier.md").read_text()
    assert readme.read_text() == (ROOT / "README.md").read_text()
