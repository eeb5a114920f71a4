"""The report of ``benchmarks/gpu.sh``: each benchmark's JSON checked against its goal (issue #19).

``python benchmarks/_gpu_report.py WORK [--results benchmarks/RESULTS.md] [--seconds S]`` reads
``WORK/{sam_step,surface,hessian,sharpness,sharpness_lm}.json`` and the parts' logs, prints the section, and with
``--results`` replaces the file's section between ``<!-- gpu.sh begin -->`` and ``<!-- gpu.sh end -->``
(appended when there is none) with it, written atomically. A JSON that is missing or lacks what a goal
reads is an error (exit code 1): the dry run in CI catches a benchmark whose output changed shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from landscape.storage import atomic_write_text

BEGIN, END = "<!-- gpu.sh begin -->", "<!-- gpu.sh end -->"
PARTS = ("sam_step", "surface", "hessian", "sharpness", "sharpness_lm")


def _row(rows: list[dict[str, Any]], key: str, value: str) -> dict[str, Any]:
    for row in rows:
        if row.get(key) == value:
            return row
    raise KeyError(f"no row with {key} = {value!r} (rows: {[r.get(key) for r in rows]})")


def sam_step_goals(data: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """SAM / SGD per step at most 2.05, eager and compiled; what compiling gains."""
    rows = data["full_step"]
    goals = []
    for suffix in ("", " compiled"):
        ratio = _row(rows, "optimizer", "sam" + suffix)["ratio_to_sgd"]
        goals.append((f"SAM / SGD step time{suffix}", ratio, "<= 2.05", ratio <= 2.05))
    for name in ("sgd", "sam"):
        gain = _row(rows, "optimizer", name)["median_s"] / _row(rows, "optimizer", name + " compiled")["median_s"]
        goals.append((f"{name.upper()} step, eager / compiled", gain, "report", True))
    return goals


_SURFACE_GOALS = {
    "auto_vs_plain_loop": "surface, plain loop / default time",
    "auto_vs_loss_landscapes": "surface, loss-landscapes / default time",
    "auto_vs_limit": "surface, forward-only limit / default time",
    "best_ours_vs_plain_loop_gpu": "surface, plain loop / best batched time (GPU)",
}


def surface_goals(data: dict[str, Any]) -> list[tuple[str, float, str, bool | None]]:
    """The default surface never more than 5% slower than the plain loop (ratio >= 1/1.05); on the CPU at
    least loss-landscapes' speed and within 5% of the forward-only limit; on a GPU batched >= 5x the loop."""
    return [(_SURFACE_GOALS.get(name, name), goal["ratio"], f">= {goal['required']:.3g}", goal["met"])
            for name, goal in data["goals"].items()]


def hessian_goals(data: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """One Hessian-vector product (the auto method) at most 3x one full-dataset gradient."""
    ratio = data["hvp_over_gradient_auto"]
    return [(f"HVP ({data['hvp_method_auto']}) / full-dataset gradient", ratio, "<= 3", ratio <= 3)]


def sharpness_goals(data: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """m-sharpness at m = 1 at least 10x our own per-chunk loop."""
    speedup = data["m1_speedup_over_loop"]
    return [("m = 1 sharpness, loop / default time", speedup, ">= 10", speedup >= 10)]


def sharpness_lm_goals(data: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """m = 1 sharpness of Hugging Face language models (no goal of the issue's: reported)."""
    return [(f"m = 1 sharpness of {model}, loop / default time", speedup, "report", True)
            for model, speedup in data["m1_speedup_over_loop"].items()]


GOALS: dict[str, Callable[[dict[str, Any]], list[tuple[str, Any, str, bool | None]]]] = {
    "sam_step": sam_step_goals, "surface": surface_goals, "hessian": hessian_goals, "sharpness": sharpness_goals,
    "sharpness_lm": sharpness_lm_goals}


def section(work: Path, seconds: int | None) -> str:
    """The markdown section: where it ran, every goal met or not, and each benchmark's printed tables."""
    data = {}
    for part in PARTS:
        path = work / f"{part}.json"
        try:
            data[part] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"_gpu_report: {path}: {error}") from None
    env = data["sam_step"]["env"]
    lines = [BEGIN, "## GPU validation (`benchmarks/gpu.sh`)", "",
             f"### {env['device']}, torch {env['torch']}, {datetime.date.today().isoformat()}"
             + (f", {seconds} s in all" if seconds is not None else ""), "",
             "| goal (issue #19) | measured | target | met |", "|---|---:|---|---|"]
    for part in PARTS:
        try:
            goals = GOALS[part](data[part])
        except (KeyError, TypeError) as error:
            raise SystemExit(f"_gpu_report: {work / (part + '.json')} lacks what its goal reads: {error}") from None
        lines += [f"| {name} | {'-' if value is None else f'{value:.3g}'} | {target} | "
                  f"{'n/a' if met is None else 'yes' if met else 'NO'} |" for name, value, target, met in goals]
    for part in PARTS:
        log = work / f"{part}.log"
        if log.exists():
            lines += ["", f"`{part}`:", "", "```text", log.read_text().strip(), "```"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(results: Path, text: str) -> None:
    """Put ``text`` in place of the file's gpu.sh section (or at its end), atomically."""
    old = results.read_text()
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(results, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the directory with the parts' JSON and logs")
    parser.add_argument("--results", type=Path, default=None, help="replace this file's GPU section")
    parser.add_argument("--seconds", type=int, default=None, help="how long the whole run took")
    args = parser.parse_args(argv)
    text = section(args.work, args.seconds)
    print(text)
    if args.results is not None:
        replace_section(args.results, text)
        print(f"wrote the GPU section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
