"""``lrdeploy train`` as a command: one-line usage errors with exit code 2, and a run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from lrdeploy.trainer.__main__ import main


def test_the_cli_module_imports_without_torch() -> None:
    code = "import sys, lrdeploy.trainer.cli, lrdeploy; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "lrpet"], "LRPET needs a rank"),
        (["--method", "lrpet", "--rank-ratio", "1.5"], "rank ratio must be in (0, 1]"),
        (["--method", "lorita", "--rank-ratio", "0.2"], "--rank-ratio applies to --method lrpet only"),
        (
            ["--method", "lrpet", "--rank-ratio", "0.2", "--factor", "3"],
            "--factor applies to --method lorita",
        ),
        (["--method", "lorita", "--factor", "1"], "--factor must be an integer ≥ 2"),
        (["--method", "svd"], "unknown --method 'svd'"),
        (["--arch", "alexnet", "--subset", "8"], "unknown architecture 'alexnet'"),
        (["--data", "missing.npz"], "--data must be 'mnist'"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--device", "tpu"], "--device must be one of"),
        (["--method", "lrpet", "--ranks", "missing.json"], "--ranks: cannot read"),
        (["--exclude", "fc3"], "--include/--exclude choose the layers"),
        (["--resume", "-o", "none.onnx"], "no checkpoint"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_lrpet_run_writes_model_card_ranks_and_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ranks.json").write_text(json.dumps({"fc1": 4, "fc2": 3}))
    argv = ["--method", "lrpet", "--arch", "mlp", "--ranks", "ranks.json", "--epochs", "1", "--subset", "128"]
    assert main([*argv, "-o", "m.onnx", "--no-progress"]) == 0
    assert "wrote m.onnx" in capsys.readouterr().out
    for name in ("m.onnx", "m.card.json", "m.card.md", "m.ranks.json", "m.ckpt.pt"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "m.ranks.json").read_text()) == {"fc1": 4, "fc2": 3}
    assert "--overrides m.ranks.json" in (tmp_path / "m.card.md").read_text()


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (
            {"method": "lorita", "factor": 3, "include": [], "exclude": ["fc3"]},
            "--energy 0.999 --exclude fc3",
        ),
        (
            {"method": "lrpet", "rank_ratio": 0.25, "ranks": {}, "include": ["fc*"], "exclude": []},
            "--rank-ratio 0.25 --include fc*",
        ),
        ({"method": "baseline"}, "--rank-ratio 0.3"),
    ],
)
def test_the_card_says_how_to_compress_the_model_as_it_was_trained(method, expected) -> None:
    from lrdeploy.trainer.card import _compress_hint

    assert f"lrdeploy compress m.onnx {expected}" in _compress_hint({"config": {"method": method}}, "m.onnx")
