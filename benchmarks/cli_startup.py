"""How long the ``vaeflow`` command takes to answer ``--help`` and ``list``, against the time of
``python -c "import torch, lightning"``, the floor of any command that trains.

Each command runs ``--repeats`` times in a fresh interpreter, the commands alternated so that load
from other processes falls on all of them; the medians are printed side by side with the ratio
to the import time. Target: ``vaeflow --help`` and ``vaeflow list`` at most 1.2x the import.
``vaeflow fit --help`` (which builds LightningCLI's parsers) is printed for comparison, without
a target.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeats 11
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

#: ratio of a fast answer's time to the import of torch and Lightning it must stay under
TARGET = 1.2
BASELINE = "import torch, lightning"
COMMANDS: dict[str, list[str]] = {
    BASELINE: ["-c", BASELINE],
    "vaeflow --help": ["-m", "vaeflow", "--help"],
    "vaeflow list": ["-m", "vaeflow", "list"],
    "vaeflow fit --help": ["-m", "vaeflow", "fit", "--help"],
}
#: the commands the target applies to
FAST = ("vaeflow --help", "vaeflow list")


def seconds(args: list[str]) -> float:
    """Wall-clock seconds of ``python ARGS`` in a fresh interpreter, its output discarded."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command")
    args = parser.parse_args()
    for command in COMMANDS.values():  # warm the file cache: the first run reads from disk
        seconds(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(seconds(command))
    baseline = statistics.median(times[BASELINE])
    print(f"median of {args.repeats} runs each, {sys.executable}")
    print(f"{'command':<24} {'seconds':>8} {'x import':>9}  target")
    failed = False
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / baseline
        target = ""
        if name in FAST:
            ok = ratio <= TARGET
            failed |= not ok
            target = f"<= {TARGET}x: {'met' if ok else 'MISSED'}"
        print(f"{name:<24} {median:8.2f} {ratio:8.2f}x  {target}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
