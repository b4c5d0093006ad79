"""Start-up time of the ``moelab`` command line: ``moelab --help`` and every ``moelab X --help``, each in a
fresh interpreter, against ``python -c pass`` (the floor) and ``python -c "import torch"`` (what every
command paid before the CLI imported torch lazily), plus ``import moelab``.

Each command runs as the console script does (``from moelab.cli.main import main; main()``) with this
checkout's ``src`` first on the path. Timing: interleaved rounds (every command once per round, order
rotated), median wall time per command; ratios to the two references are what to compare on a shared machine.

    python benchmarks/startup.py [--rounds 7] [--quick]

Writes benchmarks/results/startup.json and .md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from common import markdown_table, median, write_results  # noqa: E402  (imports torch: only this parent)

CLI = "import sys; from moelab.cli.main import main; sys.argv[0] = 'moelab'; sys.exit(main())"
REFERENCES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"],
              "python -c 'import moelab'": ["-c", "import moelab"]}


def help_commands(quick: bool) -> dict[str, list[str]]:
    """{label: interpreter args} for ``moelab --help`` and each ``moelab X --help`` (X: top-level commands)."""
    from moelab.cli.main import build_parser

    parser = build_parser()
    names = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    chosen = ["train", "generate", "route", "sweep"] if quick else list(names)
    out = {"moelab --help": ["-c", CLI, "--help"]}
    out.update({f"moelab {n} --help": ["-c", CLI, n, "--help"] for n in chosen if n in names})
    return out


def time_once(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if res.returncode not in (0,):
        raise RuntimeError(f"{args} exited {res.returncode}: {res.stderr.decode()[-500:]}")
    return dt


def measure(cases: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up: the page cache and .pyc files, untimed
        time_once(cases[n])
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            times[n].append(time_once(cases[n]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 4 commands (a smoke test of the script)")
    ap.add_argument("--name", default="startup", help="results file name")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    cases = {**REFERENCES, **help_commands(args.quick)}
    times = measure(cases, rounds)
    floor, torch_s = median(times["python -c pass"]), median(times["python -c 'import torch'"])
    rows = [{"command": n, "median_s": median(t), "vs_python": median(t) / floor, "vs_import_torch": median(t) / torch_s,
             "under_0.5s": median(t) < 0.5, "times_s": t} for n, t in times.items()]
    for r in rows:
        print(f"{r['command']:40s} {r['median_s']:.3f} s  {r['vs_python']:.2f}x python  "
              f"{r['vs_import_torch']:.2f}x import torch", flush=True)
    load = os.getloadavg()[0]
    md = ["# Start-up: `moelab --help` and `moelab X --help` (fresh interpreter each)\n",
          f"Machine: {os.cpu_count()} CPUs, load average {load:.1f} at {time.strftime('%Y-%m-%d %H:%M:%S')}, "
          f"{rounds} interleaved rounds, medians (target: every help under 0.5 s on an idle 2-core machine).\n",
          markdown_table(rows, ["command", "median_s", "vs_python", "vs_import_torch", "under_0.5s"])]
    write_results(args.name, {"rows": rows, "rounds": rounds, "load_avg_1m": load, "python": sys.version,
                              "quick": args.quick}, "\n".join(md))


if __name__ == "__main__":
    main()
