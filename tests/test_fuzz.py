"""Fuzzing (issue 12): mutated small models give a clean one-line error or a valid output, never a crash,
a traceback or a modified input. Seeded (derandomized) and bounded for CI; ``benchmarks/fuzz.py`` runs
the same property for longer. Findings of the long run are kept below as regression cases."""

from __future__ import annotations

import pytest
from fuzzing import BASES, check_outcome, fuzz_cases, mutate
from hypothesis import given, settings

#: A hang shows as a deadline overrun; the examples take well under a second each.
DEADLINE_MS = 20_000


@settings(max_examples=40, derandomize=True, deadline=DEADLINE_MS, database=None)
@given(fuzz_cases())
def test_mutated_models_fail_cleanly_or_compress(case):
    _, _, data, options = case
    check_outcome(data, options)


@pytest.mark.parametrize("base", sorted(BASES))
def test_unmutated_bases_compress(base):
    assert check_outcome(BASES[base]().SerializeToString(), {"rank_ratio": 0.5, "requantize": True}) == "ok"


# Regression cases from the fuzzer (mutations as it drew them), each a crash before its fix.
FINDINGS: list[tuple[str, list[tuple], dict]] = [
    # an empty INTS attribute: graphsurgeon cannot type it on export ("internal error: ValueError")
    ("fp16_cast", [("attr", 5, "transA", []), ("op", 1, "Conv")], {"rank_ratio": 0.5, "verify": False}),
    ("conv_bn", [("attr", 0, "dilations", [])], {"rank_ratio": 0.5, "verify": False}),
    # a Cast whose input is an empty (unnamed) operand: no shape ("internal error: TypeError")
    ("fp16_cast", [("rename_in", 0, 0, "")], {"rank_ratio": 0.5, "verify": False}),
    # group=0 on a Conv, once grouped convs were factorized: "internal error: ZeroDivisionError"
    ("conv_bn", [("attr", 0, "group", 0)], {"rank_ratio": 0.5, "verify": False}),
    # a params budget on a model left with no weights: "internal error: ZeroDivisionError"
    ("einsum", [("drop_init", 0)], {"target_params": 0.6, "verify": False}),
]


@pytest.mark.parametrize(("base", "mutations", "options"), FINDINGS)
def test_fuzz_findings_stay_fixed(base, mutations, options):
    check_outcome(mutate(BASES[base](), mutations).SerializeToString(), options)
