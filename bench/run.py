"""``make bench``: every benchmark script in turn, each as its own process; non-zero if any failed.

    .venv/bin/python bench/run.py [--quick]

Runs bench/outbound.py, bench/previews.py, bench/inbound.py, bench/websocket.py, bench/callbacks.py,
bench/cardkit.py, bench/shares.py and bench/fanout.py (a script that is not there is skipped and said so),
passing ``--quick`` through. Each prints its own tables and what it measured; a benchmark fails only on a broken
invariant or a crash, never on a missed performance target.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("outbound.py", "previews.py", "inbound.py", "websocket.py", "callbacks.py", "cardkit.py", "shares.py",
           "fanout.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    outcomes: list[tuple[str, str, float]] = []
    for name in SCRIPTS:
        script = BENCH / name
        if not script.exists():
            outcomes.append((name, "not present, skipped", 0.0))
            continue
        print(f"\n===== bench/{name} =====", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script), *(["--quick"] if args.quick else [])],
                               cwd=BENCH.parent)
        outcomes.append((name, "ok" if code == 0 else f"FAILED (exit {code})", time.monotonic() - started))
    print("\n===== summary =====")
    for name, outcome, seconds in outcomes:
        print(f"bench/{name:<12} {outcome:<24} {seconds:>6.0f} s")
    return 1 if any(outcome.startswith("FAILED") for _, outcome, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
