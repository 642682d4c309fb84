"""``Testing/benchmarks/gpu_check.py`` on the CPU: a quick run of all three parts (the device tests narrowed to the
t-product's), its report, and the rules that make the check fail (a failed test, a Dice below 0.99, a part stopped).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from TCURLoRALib.api import adapter_store, load_base
from TCURLoRALib.cards import Label

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
CHECK = BENCHMARKS / "gpu_check.py"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402


def run_check(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *arguments], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TCURLORA_HOME": str(home)})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = run_check("--device", "cpu", "--quick", "--tests-k", "tproduct", "--out", str(out), home=out / "home")
    return done, out


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``### heading``, header and rule left out."""
    section = text.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_quick_cpu_check_passes_with_all_three_parts(quick_run) -> None:
    done, out = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert text.startswith("## GPU check on `cpu` (--quick): passed")
    assert "### Problems" not in text
    assert f"torch {torch.__version__}" in text and "torch threads 1 in the children" in text  # the CPU default
    assert re.search(r"Wall time: \d+ s in all; tests \d+ s \(budget \d+ s\), steps \d+ s .*, segment \d+ s", text)

    # (a) the t-product's device tests on the asked device, counted from pytest's own report
    assert "`python -m pytest Testing -m gpu --device cpu -q -p no:cacheprovider --junitxml=DIR/tests.xml -k tproduct`" \
        in text
    expected = subprocess.run([sys.executable, "-m", "pytest", "Testing/test_tproduct.py", "-m", "gpu",
                               "--collect-only", "-q", "-p", "no:cacheprovider"], capture_output=True, text=True,
                              cwd=gpu_check.REPO_ROOT).stdout.count("::")
    assert expected > 0
    assert table_rows(text, "Tests on the device") == [[str(expected), str(expected), "0", "0", "0", "0",
                                                        table_rows(text, "Tests on the device")[0][-1]]]

    # (b) every method in float32 and bfloat16, with a time, its ratio to tCURLoRA and a measured peak
    steps = table_rows(text, "Training steps side by side")
    names = [gpu_check.bench_core.method_name(method) for method in gpu_check.METHODS]
    assert [(row[0], row[1]) for row in steps] == [(name, dtype) for dtype in ("float32", "bfloat16") for name in names]
    # LoRA needs peft, which Testing/requirements.txt leaves out: without it (CI's new virtualenv) its rows say why.
    without_peft = importlib.util.find_spec("peft") is None
    lora_rows = [row for row in steps if row[0].startswith("LoRA")]
    assert len(lora_rows) == 4
    if without_peft:
        assert all(row[2] == "peft not installed" for row in lora_rows), lora_rows
        assert "training-step rows skipped" in text
        steps = [row for row in steps if row not in lora_rows]
    for row in steps:
        assert re.fullmatch(r"[\d,]+\.\d \[[\d,]+\.\d, [\d,]+\.\d\]", row[3]), row
        assert float(row[4]) > 0 and float(row[5].replace(",", "")) > 0, row
    assert {row[4] for row in steps if row[0] == names[0]} == {"1.00"}
    full = next(row for row in steps if row[0] == "full fine-tuning")
    assert int(full[2].replace(",", "")) > int(steps[0][2].replace(",", ""))  # full trains more than tCURLoRA

    # (c) one Dice row for every label of the base and of each shipped adapter, all agreeing on the CPU
    shipped = [entry for entry in adapter_store().list() if entry.source == "shipped"]
    assert shipped
    expected_rows = [("base", label.name) for label in load_base(None).card.labels if label.value != 0]
    expected_rows += [(entry.name, label.name) for entry in shipped for label in entry.card.labels if label.value != 0]
    segment = table_rows(text, "Shipped models: the device's label map against the CPU's")
    assert [(row[0], row[1]) for row in segment] == expected_rows
    assert all(row[2] == "1.0000" and row[5] == "yes" and row[3] == row[4] for row in segment)


def test_junit_counts_read_the_quick_runs_report(quick_run) -> None:
    _, out = quick_run
    counts = gpu_check.junit_counts(out / "tests.xml")
    assert counts["tests"] == counts["passed"] > 0
    assert counts["failed"] == counts["errors"] == counts["skipped"] == 0 and counts["failed_names"] == []


def labelled(shape=(20, 20, 20)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint16)
    labels[2:12, 2:12, 2:12] = 1  # 1,000 voxels
    labels[14:18, 14:18, 14:18] = 2  # 64 voxels
    return labels


LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "one", (1, 1, 1)), Label(2, "two", (2, 2, 2)),
          Label(3, "absent", (3, 3, 3))]


@pytest.mark.parametrize("moved, dice, ok", [(10, 2 * 990 / 1990, True), (20, 2 * 980 / 1980, False)])
def test_a_perturbed_label_map_fails_the_agreement_below_099(moved: int, dice: float, ok: bool) -> None:
    """Voxels of label 1 moved to label 2 on the 'device' map: Dice of label 1 = 2 (1000 - m) / (2000 - m), of
    label 2 = 2 * 64 / (128 + m); a label neither map has agrees (1.0)."""
    cpu = labelled()
    device = cpu.copy()
    device[tuple(np.argwhere(cpu == 1)[:moved].T)] = 2
    rows = gpu_check.label_agreement(device, cpu, LABELS)
    assert [row["name"] for row in rows] == ["one", "two", "absent"]
    assert rows[0]["dice"] == pytest.approx(dice) and rows[0]["ok"] is ok
    assert rows[1]["dice"] == pytest.approx(128 / (128 + moved)) and rows[1]["ok"] is (128 / (128 + moved) >= 0.99)
    assert rows[2]["dice"] == 1.0 and rows[2]["ok"]
    assert (rows[0]["device_voxels"], rows[0]["cpu_voxels"]) == (1000 - moved, 1000)

    results = {"parts": {"segment": {"returncode": 0, "seconds": 1.0, "rows": [
        {"model": "m", "labels": rows, "device_seconds": 1.0, "cpu_seconds": 1.0}]}}}
    found = gpu_check.problems(results)
    assert [problem for problem in found if "m, one" in problem] == ([] if ok else [
        f"segment: m, one: Dice {dice:.4f} < 0.99"])
    assert any("m, two" in problem for problem in found)  # 64 voxels: even 10 moved ones are too many


def test_label_maps_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"device \(20, 20, 20\), cpu \(20, 20, 21\)"):
        gpu_check.label_agreement(labelled(), labelled((20, 20, 21)), LABELS)


@pytest.mark.parametrize("part, result, problem", [
    ("tests", {"returncode": 1, "seconds": 1.0, "tests": 3, "passed": 2, "failed": 1, "errors": 0, "skipped": 0,
               "failed_names": ["test_x::test_y"]}, "tests: 1 failed, 0 errors: test_x::test_y"),
    ("tests", {"returncode": 4, "seconds": 1.0}, "tests: pytest exit 4 and no JUnit report"),
    ("tests", {"returncode": 5, "seconds": 1.0, "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
               "failed_names": []}, "tests: no test ran"),
    ("steps", {"returncode": None, "seconds": 150.0, "rows": []}, "steps: stopped at its time budget of 150 s"),
    ("steps", {"returncode": 0, "seconds": 1.0, "rows": [{"method": "full:0", "autocast": "bfloat16",
                                                          "error": "OutOfMemoryError: x"}]},
     "steps: full fine-tuning, bfloat16: OutOfMemoryError: x"),
    ("segment", {"returncode": 1, "seconds": 1.0, "rows": [], "error": "Traceback"}, "segment: exit 1: Traceback"),
])
def test_failed_tests_stopped_parts_and_failed_steps_fail_the_check(part: str, result: dict, problem: str) -> None:
    assert [found for found in gpu_check.problems({"parts": {part: result}})
            if found.startswith(problem)] != [], gpu_check.problems({"parts": {part: result}})


def test_a_skipped_lora_row_does_not_fail_the_check() -> None:
    rows = [{"method": "lora:1", "autocast": None, "skipped": "peft not installed"}]
    assert gpu_check.problems({"parts": {"steps": {"returncode": 0, "seconds": 1.0, "rows": rows}}}) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bad_arguments_exit_2_before_any_work(tmp_path: Path) -> None:
    done = run_check("--device", "cuda", "--out", str(tmp_path / "out"), home=tmp_path)
    assert done.returncode == 2 and "CUDA is not available here" in done.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.md").write_text("earlier\n", encoding="utf-8")
    done = run_check("--device", "cpu", "--parts", "tests,nothing", "--out", str(tmp_path / "x"), home=tmp_path)
    assert done.returncode == 2 and "--parts must be a comma-separated list of tests, steps, segment" in done.stderr
    done = run_check("--device", "cpu", "--out", str(tmp_path / "old"), home=tmp_path)
    assert done.returncode == 2 and "summary.md already exists: give --overwrite" in done.stderr
    assert (tmp_path / "old" / "summary.md").read_text(encoding="utf-8") == "earlier\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, message", [
    ("cuda", "pytest --device: device 'cuda' was asked for, but CUDA is not available here"),
    ("gpu", "pytest --device: --device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
])
def test_the_suites_device_option_refuses_a_device_it_cannot_use(device: str, message: str) -> None:
    """``pytest --device`` (Testing/conftest.py) is checked before any test runs: a usage error, no test."""
    done = subprocess.run([sys.executable, "-m", "pytest", "Testing/test_tproduct.py", "-m", "gpu", "--device", device,
                           "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=gpu_check.REPO_ROOT)
    assert done.returncode == 4 and message in done.stderr, done.stdout + done.stderr
    assert "passed" not in done.stdout
