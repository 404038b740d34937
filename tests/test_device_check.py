"""experiments.device_check (issue 22.5) runs on a CPU too: its JSON has every section, its
test summary reads pytest's results, and a missing module of the fit is named, not a crash."""
import json
import os
import subprocess
import sys

import pytest

from experiments import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, *flags):
    out = tmp_path / "device.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "experiments.device_check", "--quick", "--out", str(out), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(c) roofline" in proc.stdout or "--skip-roofline" in flags
    with open(out) as f:
        return json.load(f)


def test_quick_run_writes_every_section(tmp_path):
    res = run(tmp_path, "--skip-tests", "--skip-fit")
    assert {"date", "argv", "size", "host", "device", "roofline"} <= set(res)
    assert res["device"]["platform"] == "cpu" and res["device"]["jax"]
    assert res["host"]["cpu_model"] and isinstance(res["host"]["flags"], list)
    (row,) = res["roofline"]["rows"]
    for name in ("matmul_f32_highest", "matmul_f32_default", "matmul_bf16"):
        assert row[name]["tflops"] > 0
    assert row["knn_indexed_f32"]["queries_per_s"] > 0 and row["knn_indexed_f32"]["tflops_ranking"] > 0
    assert row["knn_default_ranking"] in ("float32", "bfloat16")


@pytest.mark.slow
def test_quick_fit_on_cpu_twice_is_identical(tmp_path):
    res = run(tmp_path, "--skip-tests", "--skip-roofline")
    fit = res["fit"]
    assert set(fit["runs"]) == {"cpu", "device"}
    assert fit["metrics_equal"] and fit["max_abs_score_diff"] == 0.0 and fit["max_abs_map_diff"] == 0.0
    assert set(fit["runs"]["cpu"]["metrics"]) >= {"mAUROC_sp_max", "mAUROC_px", "mAUPRO_px"}


def test_test_summary_counts_and_names_failures(tmp_path):
    f = tmp_path / "test_sample.py"
    f.write_text("import pytest\n\n"
                 "def test_ok():\n    pass\n\n"
                 "def test_bad():\n    assert 1 == 2\n\n"
                 "@pytest.fixture\ndef broken():\n    raise RuntimeError('no')\n\n"
                 "def test_err(broken):\n    pass\n\n"
                 "@pytest.mark.skip\ndef test_skip():\n    pass\n")
    res = device_check.run_tests((str(f),), timeout=300)
    assert (res["passed"], res["failed"], res["errors"], res["skipped"]) == (1, 1, 1, 1), res
    assert any(n.endswith("::test_bad") for n in res["failing"])
    assert any("::test_err (error" in n for n in res["failing"])


def test_a_missing_module_of_the_fit_is_named(monkeypatch):
    monkeypatch.setattr(device_check, "FIT_MODULES", {**device_check.FIT_MODULES, "grain_not_here": "grain-wheel"})
    res = device_check.run_fits("highest", "quick")
    assert "grain_not_here" in res["skipped"] and "grain-wheel" in res["skipped"]
