"""benchmarks/gpu.sh's report: each benchmark's JSON checked against its goal, RESULTS.md's section replaced."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("_gpu_report", ROOT / "benchmarks" / "_gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(work: Path, *, sam_ratio: float = 2.01, hvp: float = 2.5) -> None:
    steps = [{"optimizer": "sgd", "median_s": 1.0, "ratio_to_sgd": 1.0},
             {"optimizer": "sam", "median_s": sam_ratio, "ratio_to_sgd": sam_ratio},
             {"optimizer": "sgd compiled", "median_s": 0.5, "ratio_to_sgd": 1.0},
             {"optimizer": "sam compiled", "median_s": 1.02, "ratio_to_sgd": 2.04}]
    parts = {"sam_step": {"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.14.1"}, "full_step": steps},
             "surface": {"goals": {"auto_vs_plain_loop": {"ratio": 5.9, "required": 1 / 1.05, "met": True},
                                   "auto_vs_loss_landscapes": {"ratio": None, "required": 1.0, "met": None},
                                   "best_ours_vs_plain_loop_gpu": {"ratio": 6.5, "required": 5.0, "met": True}}},
             "hessian": {"hvp_method_auto": "jvp", "hvp_over_gradient_auto": hvp},
             "sharpness": {"m1_speedup_over_loop": 12.0},
             "sharpness_lm": {"m1_speedup_over_loop": {"gpt2": 31.0, "llama": 27.5}}}
    for name, data in parts.items():
        (work / f"{name}.json").write_text(json.dumps(data))
        (work / f"{name}.log").write_text(f"{name} table\n")


def test_the_section_says_which_goals_are_met(tmp_path):
    _results(tmp_path, sam_ratio=2.2, hvp=2.5)
    text = _report().section(tmp_path, seconds=421)
    assert "### NVIDIA H100 80GB HBM3, torch 2.14.1" in text and "421 s in all" in text
    assert "| SAM / SGD step time | 2.2 | <= 2.05 | NO |" in text
    assert "| SAM / SGD step time compiled | 2.04 | <= 2.05 | yes |" in text
    assert "| SGD step, eager / compiled | 2 | report | yes |" in text
    assert "| HVP (jvp) / full-dataset gradient | 2.5 | <= 3 | yes |" in text
    assert "| surface, plain loop / best batched time (GPU) | 6.5 | >= 5 | yes |" in text
    assert "| surface, plain loop / default time | 5.9 | >= 0.952 | yes |" in text
    assert "| surface, loss-landscapes / default time | - | >= 1 | n/a |" in text
    assert "| m = 1 sharpness, loop / default time | 12 | >= 10 | yes |" in text
    assert "| m = 1 sharpness of llama, loop / default time | 27.5 | report | yes |" in text
    assert "```text\nhessian table\n```" in text


def test_the_results_file_keeps_everything_but_its_gpu_section(tmp_path):
    report = _report()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## CPU\n\nnumbers\n")
    _results(tmp_path)
    assert report.main([str(tmp_path), "--results", str(results)]) == 0
    first = results.read_text()
    assert first.startswith("# Benchmark results\n\n## CPU\n\nnumbers\n\n<!-- gpu.sh begin -->")
    results.write_text(first + "\n## Later section\n")
    _results(tmp_path, sam_ratio=1.99)
    report.main([str(tmp_path), "--results", str(results)])
    second = results.read_text()
    assert second.count("<!-- gpu.sh begin -->") == 1 and second.endswith("\n## Later section\n")
    assert "| SAM / SGD step time | 1.99 | <= 2.05 | yes |" in second


def test_a_benchmark_whose_output_changed_shape_is_an_error(tmp_path):
    _results(tmp_path)
    (tmp_path / "hessian.json").write_text(json.dumps({"hvp": 2.0}))
    with pytest.raises(SystemExit, match="hessian.json lacks what its goal reads"):
        _report().section(tmp_path, seconds=None)
    (tmp_path / "sharpness.json").unlink()
    with pytest.raises(SystemExit, match="sharpness.json"):
        _report().section(tmp_path, seconds=None)
