"""``lrdeploy train`` as a command: one-line usage errors with exit code 2, and a run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
        (["--method", "lorita", "--rank-ratio", "0.2"], "--rank-ratio applies to --method lrpet or bsr only"),
        (
            ["--method", "lrpet", "--rank-ratio", "0.2", "--factor", "3"],
            "--factor applies to --method lorita",
        ),
        (["--method", "lorita", "--factor", "1"], "--factor must be an integer ≥ 2"),
        (["--method", "svd"], "unknown --method 'svd'"),
        (["--arch", "alexnet", "--subset", "8"], "unknown architecture 'alexnet'"),
        (["--data", "missing.npz"], "--data missing.npz: no such file; give 'mnist'"),
        (["--data", ""], "--data is empty"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--warmup", "2"], "--warmup must be in [0, --epochs]"),
        (["--warmup", "-0.5"], "--warmup must be in [0, --epochs]"),
        (["--device", "tpu"], "--device must be one of"),
        (["--method", "lrpet", "--ranks", "missing.json"], "--ranks: cannot read"),
        (["--exclude", "fc3"], "--include/--exclude choose the layers"),
        (["--resume", "-o", "none.onnx"], "no checkpoint"),
        (["-o", "same.onnx", "--checkpoint", "same.onnx"], "is where -o same.onnx writes its ONNX model"),
        (["-o", "cc.onnx", "--checkpoint", "cc.card.json"], "writes its JSON card"),
        (["-o", "cc.onnx", "--checkpoint", "./cc.card.md"], "writes its Markdown card"),
        (["-o", "cc.onnx", "--checkpoint", "cc.ranks.json"], "writes its LRPET ranks"),
        (["-o", "adir"], "-o/--output adir is a directory"),
        (["-o", "afile/x.onnx"], "afile is a file, not a directory"),
        (["-o", "missing/x.onnx"], "directory missing does not exist"),
        (["-o", "adir2/"], "-o/--output adir2/ ends with '/'"),
        (["-o", ""], "-o/--output is empty"),
        (["-o", "c.onnx", "--checkpoint", "adir"], "--checkpoint adir is a directory"),
        (["-o", "c.onnx", "--checkpoint", "junk.pt", "--resume"], "junk.pt is not an lrdeploy checkpoint"),
        (
            ["--method", "lrpet", "--rank-ratio", "0.3", "--include", "nomatch"],
            "--include 'nomatch' matches no",
        ),
        (["--method", "lorita", "--exclude", "fc9"], "the layers are: conv1, conv2, fc1"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--subset", "16", "--epochs", "1", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before writing anything


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": (50,), "y": (40,)}, "x has 50 images but y has 40 labels"),
        ({"x_train": (50,), "y_train": (40,), "x_test": (10,), "y_test": (10,)}, "x_train has 50 images"),
        ({"x_train": (50,), "y_train": (50,), "x_test": (10,), "y_test": (12,)}, "y_test has 12 labels"),
    ],
)
def test_npz_with_more_images_than_labels_is_refused(arrays, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = {
        k: np.zeros((n, 8, 8), np.uint8) if k.startswith("x") else np.arange(n) % 2
        for k, (n,) in arrays.items()
    }
    np.savez(tmp_path / "d.npz", **data)
    assert main(["--data", "d.npz", "--subset", "16", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_data_folder_given_as_empty_string_does_not_train_on_the_current_directory(
    tmp_path, monkeypatch, capsys
) -> None:
    image = pytest.importorskip("PIL.Image")
    monkeypatch.chdir(tmp_path)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / label / f"{i}.png")
    assert main(["--data", "", "--arch", "mlp", "--epochs", "1", "--no-progress"]) == 2
    assert "--data is empty" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_saved_leaves_no_temporary_file(tmp_path, monkeypatch, capsys) -> None:
    from lrdeploy.trainer import loop

    def failing_save(state, path) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop.torch, "save", failing_save)
    argv = ["--arch", "mlp", "--epochs", "1", "--subset", "16", "-o", "m.onnx", "--no-progress"]
    assert main(argv) == 1
    assert "cannot write m.ckpt.pt: No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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
