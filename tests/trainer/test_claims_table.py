"""benchmarks/claims_table.py and claims_tune.py: the verdict on the printed gap, the shipped markdown is the
one the JSON renders to, every summary row is at its architecture's chosen settings, settings parse."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import claims_table  # noqa: E402
import claims_tune  # noqa: E402


@pytest.mark.parametrize(
    ("value", "reference", "verdict"),
    [(0.989, 0.994, "yes"), (0.9885, 0.994, "no"), (0.994, 0.994, "yes"), (None, 0.994, "—")],
)
def test_the_verdict_is_on_the_printed_gap(value, reference, verdict) -> None:
    assert claims_table._verdict(value, reference) == verdict  # 0.989 - 0.994 is -0.0050000000000000044


def test_the_shipped_markdown_is_what_the_json_renders_to() -> None:
    results = claims_table.read_results(ROOT / "models" / "RESULTS_claims.json")
    assert (ROOT / "models" / "RESULTS_claims.md").read_text() == claims_table.markdown(results)


def test_the_summary_has_one_row_per_arch_and_method_at_the_chosen_settings() -> None:
    """... and, marked "+ augment", one more for each that was also fine-tuned with --augment."""
    results = claims_table.read_results(ROOT / "models" / "RESULTS_claims.json")
    lines = claims_table.summary(results["rows"])[2:]
    cells = [[cell.strip() for cell in line.split("|")[1:6]] for line in lines]
    plain = [(arch, method) for arch, method, *_, tuned in cells if not tuned.endswith("+ augment")]
    shifted = [(arch, method) for arch, method, *_, tuned in cells if tuned.endswith("+ augment")]
    assert sorted(plain) == sorted((a, m) for a in claims_table.ARCHS for m in claims_table.METHODS)
    assert len(set(shifted)) == len(shifted) and set(shifted) <= set(plain)
    augmented = [r for r in results["rows"] if claims_table._settings(r)["augment"]]
    assert all("+ augment" in claims_table._tuning(r) for r in augmented)


def test_settings_parse_into_finetune_keywords() -> None:
    assert claims_tune.parse_setting("optimizer=adam,lr=0.001,epochs=5,warmup=0.5") == {
        "optimizer": "adam",
        "lr": 0.001,
        "epochs": 5,
        "warmup": 0.5,
    }
    assert claims_tune.parse_setting("augment=true,epochs=2") == {"augment": True, "epochs": 2}
    assert claims_tune.parse_setting("augment=0") == {"augment": False}
    with pytest.raises(SystemExit, match="augment takes true or false, got 'yes please'"):
        claims_tune.parse_setting("augment=yes please")
    assert claims_tune.parse_setting("none") is None
    with pytest.raises(SystemExit, match="unknown field 'momentum'"):
        claims_tune.parse_setting("momentum=0.5")
