"""Start-up: the wall time of `ownership plan` and `ownership lint` on a small adapter folder, beside the floor
of starting Python (`python -c pass`) and the cost of `import torch`, which those commands never pay.

Each command runs 10 times as a fresh process; the figure is the median. Target: plan and lint within 0.3 s of
`python -c pass`.

    .venv/bin/python bench/startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "tests/fixtures/data/qwen3_moe/lora_per_expert"
CONFIG = ROOT / "tests/fixtures/data/qwen3_moe/base/config.json"
RUNS = 10

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "ownership plan (adapter, --all-ranks)": [
        sys.executable,
        "-m",
        "ownership",
        "plan",
        str(ADAPTER),
        "--config",
        str(CONFIG),
        "--mesh",
        "ep=2",
        "--all-ranks",
    ],
    "ownership lint (adapter)": [
        sys.executable,
        "-m",
        "ownership",
        "lint",
        str(ADAPTER),
        "--config",
        str(CONFIG),
        "--mesh",
        "ep=2",
    ],
}


def median_seconds(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    results = {name: median_seconds(argv) for name, argv in COMMANDS.items()}
    floor = results["python -c pass"]
    print(f"{'command':40} {'median s':>9} {'over pass':>10}")
    for name, seconds in results.items():
        print(f"{name:40} {seconds:9.3f} {seconds - floor:10.3f}")
    for name in ("ownership plan (adapter, --all-ranks)", "ownership lint (adapter)"):
        verdict = "met" if results[name] - floor <= 0.3 else "MISSED"
        print(f"{name}: {results[name] - floor:.3f} s over `python -c pass` (target <= 0.3): {verdict}")


if __name__ == "__main__":
    main()
