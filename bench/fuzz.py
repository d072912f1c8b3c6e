"""A longer fuzz run of tinkerlm's untrusted inputs: the harness of tests/fuzz.py for N cases or T seconds per target.

Prints, per target, the cases tried, how they ended (success, TinkerError, failures) and each distinct failure
(outcome and file:line), and writes every new failing case into a folder (default $TMPDIR/tinkerlm-fuzz-found/):
copy the ones worth keeping into tests/fuzz_cases/, where tests/test_fuzz.py replays them in every run.

    .venv/bin/python bench/fuzz.py                                   # every target, 3 minutes each, seed 0
    .venv/bin/python bench/fuzz.py --seconds 60 --targets template,request --seed 7
    .venv/bin/python bench/fuzz.py --cases 500 --out /tmp/found --memory-gb 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fuzz  # noqa: E402  (tests/fuzz.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(fuzz.TARGETS), help="comma-separated (default: all)")
    p.add_argument("--seconds", type=float, default=180.0, help="time per target (default 180)")
    p.add_argument("--cases", type=int, default=None, help="cases per target (default: no limit, --seconds rules)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--deadline", type=float, default=fuzz.DEADLINE_S, help="seconds per case (default %(default)s)")
    p.add_argument("--memory-gb", type=float, default=fuzz.MEMORY_BYTES / 2**30, help="worker RLIMIT_AS (default 3)")
    p.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "tinkerlm-fuzz-found", help="folder for failing cases"
    )
    a = p.parse_args()
    targets = [t for t in a.targets.split(",") if t]
    unknown = [t for t in targets if t not in fuzz.TARGETS]
    if unknown:
        sys.exit(f"unknown target(s) {unknown}; known: {', '.join(fuzz.TARGETS)}")

    seeds = fuzz.make_seeds(Path(tempfile.gettempdir()) / "tinkerlm-fuzz-seeds")
    runner = fuzz.Runner(seeds, deadline=a.deadline, memory=int(a.memory_gb * 2**30))
    known: set = set()
    rows = []
    try:
        for target in targets:
            t0 = time.monotonic()
            outcomes: dict[str, int] = {}
            tried, failures = fuzz.fuzz(runner, target, a.seed, a.cases, a.seconds, a.out, known, outcomes)
            rows.append((target, tried, outcomes, failures, time.monotonic() - t0))
            ok = outcomes.get("success", 0), outcomes.get("TinkerError", 0)
            bad = tried - sum(ok)
            print(f"{target:12s} {tried:6d} cases  {ok[0]:5d} ok  {ok[1]:5d} TinkerError  {bad:5d} failed  "
                  f"{len(failures):3d} distinct  {time.monotonic() - t0:6.1f} s", flush=True)  # fmt: skip
            for (_, outcome, where), path, res in failures:
                print(f"    {outcome:18s} {where:45s} {path.name}  {res.get('message', '')[:80]!r}", flush=True)
    finally:
        runner.close()
    total = sum(r[1] for r in rows)
    found = sum(len(r[3]) for r in rows)
    print(f"\n{total} cases, {found} distinct failures; cases written to {a.out}" if found else f"\n{total} cases, "
          "no failures")  # fmt: skip


if __name__ == "__main__":
    main()
