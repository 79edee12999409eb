"""scripts/gpu-check stays ready for a GPU machine: its CPU dry run passes, and its report fills the docs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from benchmarks import report as bench  # noqa: E402
import gpu_check  # noqa: E402

SCRIPT = REPO / "scripts" / "gpu-check"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=400)


def test_cpu_dry_run_passes_and_its_report_fills_the_gpu_section(tmp_path):
    """--cpu-dry-run: demo identical after preemptions, resumes ok, every ratio measured; --report-only writes them."""
    result = _gpu_check("--cpu-dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["ok"] and results["dry_run"]
    assert results["demo"]["identical"] and len(results["demo"]["preempted_at"]) == 2
    assert results["resume"]["onto cpu"]["same"] and results["resume"]["onto the device"]["same"]
    assert set(results["ratios"]["ratios"]) == set(gpu_check.GPU_TARGETS)
    assert all(value > 0 for value in results["ratios"]["ratios"].values())

    page = tmp_path / "benchmarks.md"
    original = (REPO / "docs" / "benchmarks.md").read_text()
    page.write_text(original)
    report = _gpu_check("--report-only", str(tmp_path / "out"), "--page", str(page))
    assert report.returncode == 0, report.stderr[-3000:]
    written = page.read_text()
    assert results["machine"] in written and "identical" in written and "Not run yet" not in written
    assert written.split(bench.GPU_BEGIN)[0] == original.split(bench.GPU_BEGIN)[0]  # the rest of the page kept


def test_benchmarks_page_keeps_its_gpu_section_when_rewritten():
    """scripts/bench rewriting the page keeps gpu-check's section; the docs say how to run it until it has run."""
    section = bench.gpu_block((REPO / "docs" / "benchmarks.md").read_text())
    assert section is not None and "scripts/gpu-check" in section
    page = bench.with_gpu_block("# Benchmarks\n", "figures from a GPU\n")
    assert bench.gpu_block(page) == "figures from a GPU\n"
    assert bench.with_gpu_block(page, bench.gpu_block(page)) == page


def test_without_cuda_it_says_how_to_check_it_here():
    """On a machine without CUDA (and without --cpu-dry-run) it refuses and names --cpu-dry-run."""
    result = _gpu_check("--out", "unused")
    assert result.returncode == 2 and "--cpu-dry-run" in result.stdout


def test_demo_run_twice_in_one_out_directory_is_preempted_both_times(tmp_path):
    """The demo check twice into the same --out: the second is signalled at every step again and passes (it used to
    resume the first check's finished runs, was never preempted and compared old results)."""
    first = gpu_check.check_demo(tmp_path, "cpu")
    second = gpu_check.check_demo(tmp_path, "cpu")
    assert first["ok"] and first["preempted_at"] == [5, gpu_check.STEPS_PER_EPOCH + 7]
    assert second["ok"] and second["preempted_at"] == first["preempted_at"], second
