"""The fuzzer of ``tests/test_fuzz.py`` for as long as asked: seeded rounds until the time is up.

Each round is one hypothesis run (its own seed) of the property in ``tests/fuzzing.py``; a failure is
shrunk, printed with its mutations, and the run goes on with the next seed. At the end: how many
examples ran, how many were written (valid, or warned because the input already fails onnx's checker) or
refused, the outcomes by kind (clean errors by message start), and every failure.

    python benchmarks/fuzz.py --minutes 20
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzzing import check_outcome, fuzz_cases
from hypothesis import HealthCheck, given, seed, settings

#: The scratch directory a message names (an unreadable model's path), dropped so that messages group.
_SCRATCH = re.compile(r"\S*lrdeploy-fuzz-[^/\s]+/")


def _kind(outcome: str) -> str:
    """The outcome grouped: "ok ...", or "error: " and the first 40 characters of the message."""
    head, _, message = _SCRATCH.sub("", outcome).partition(":")
    return f"{head}:{message[:40]}" if message else head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--examples", type=int, default=100, help="examples per seeded round")
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args()
    outcomes: collections.Counter[str] = collections.Counter()
    failures: dict[str, tuple] = {}
    last: list = [None]
    start, round_seed = time.monotonic(), args.first_seed
    while time.monotonic() - start < args.minutes * 60:

        @seed(round_seed)
        @settings(
            max_examples=args.examples,
            deadline=60_000,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(fuzz_cases())
        def one(case):
            last[0] = case
            outcomes[_kind(check_outcome(case[2], case[3]))] += 1

        try:
            one()
        except Exception as error:  # shrunk: last[0] is the minimal failing case
            key = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            if key not in failures:
                base, mutations, _, options = last[0]
                failures[key] = (round_seed, (base, mutations, options), traceback.format_exc()[-1500:])
                print(
                    f"FAILURE (seed {round_seed}): {key}\n  case {(base, mutations, options)!r}", flush=True
                )
        round_seed += 1
    elapsed = time.monotonic() - start
    total = sum(outcomes.values())
    print(f"\n{total} examples in {elapsed / 60:.1f} min, seeds {args.first_seed}..{round_seed - 1}")
    written = {kind: count for kind, count in outcomes.items() if kind.startswith("ok")}
    print(
        f"{sum(written.values())} written ({', '.join(f'{n} {k}' for k, n in sorted(written.items()))}), "
        f"{total - sum(written.values())} refused with a one-line error"
    )
    for outcome, count in outcomes.most_common(40):
        print(f"{count:6d}  {outcome}")
    print(f"{len(failures)} distinct failure(s)")
    for key, (found_seed, case, trace) in failures.items():
        print(f"\n--- seed {found_seed} case {case!r}\n{key}\n{trace}")


if __name__ == "__main__":
    main()
