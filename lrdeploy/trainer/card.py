"""The model card written beside each exported model: what was trained, how, on what, and how well.

``MODEL.card.json`` is for tools (``card_version`` 1); ``MODEL.card.md`` says the same for people, with the
command that compresses the model as intended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lrdeploy.trainer.files import card_paths, write_text_atomic

__all__ = ["CARD_VERSION", "card_paths", "write_card"]

CARD_VERSION = 1


def _compress_hint(card: dict[str, Any], onnx_name: str) -> str:
    """The command that compresses the model as it was trained: LRPET's ranks, with no further loss."""
    method = card["config"]["method"]
    patterns = [f"--include {p}" for p in method.get("include", [])]
    patterns += [f"--exclude {p}" for p in method.get("exclude", [])]
    if method["method"] == "lorita":  # weight decay gave each layer its own rank: keep energy, not a ratio
        command = " ".join([f"lrdeploy compress {onnx_name} --energy 0.999", *patterns])
        return f"{command}   # per-layer ranks; see models/RESULTS_lorita.md"
    if method["method"] == "bsr":  # BSR leaves the ranks to the allocator (its beam search's job)
        calib = card["config"].get("data", "mnist")
        command = " ".join([f"lrdeploy compress {onnx_name} --target-params 0.25 --calib {calib}", *patterns])
        return f"{command}   # any budget; see docs/training.md"
    if method["method"] != "lrpet":
        return f"lrdeploy compress {onnx_name} --rank-ratio 0.3   # any ratio; see models/RESULTS.md"
    if method["rank_ratio"] is None or method["ranks"]:
        return f"lrdeploy compress {onnx_name} --overrides {Path(onnx_name).stem}.ranks.json"
    return " ".join([f"lrdeploy compress {onnx_name} --rank-ratio {method['rank_ratio']:g}", *patterns])


def _markdown(card: dict[str, Any], onnx_name: str) -> str:
    config, method = card["config"], card["config"]["method"]
    hyper = {k: v for k, v in method.items() if k != "method" and v not in (None, [], {}, ())}
    rows = [
        (
            "method",
            method["method"] + (f" ({', '.join(f'{k}={v}' for k, v in hyper.items())})" if hyper else ""),
        ),
        ("architecture", config["arch"]),
        ("data", card["data"]["source"]),
        ("input", f"{card['input']['name']}: float32 {card['input']['shape']}, pixel values in [0, 1]"),
        ("classes", str(card["data"]["classes"])),
        ("test accuracy (PyTorch)", f"{card['test_accuracy']['torch']:.2%} on {card['data']['test']} images"),
        ("test accuracy (onnxruntime)", f"{card['test_accuracy']['onnxruntime']:.2%}"),
        ("parameters", f"{card['parameters']:,}"),
        (
            "training",
            f"{config['epochs']} epochs, batch {config['batch_size']}, SGD lr {config['lr']:g} "
            f"momentum {config['momentum']:g} weight decay {config['weight_decay']:g}, "
            + (f"{config['warmup']:g}-epoch linear warm-up, " if config.get("warmup") else "")
            + "cosine schedule",
        ),
        ("seed", str(config["seed"])),
        (
            "trained on",
            f"{card['environment']['device']} × {card['environment']['world_size']}, "
            f"{card['environment']['seconds']:.0f} s, torch {card['environment']['torch']}",
        ),
    ]
    lines = [f"# {onnx_name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Compress it:", "", "```", _compress_hint(card, onnx_name), "```", ""]
    if card["method_summary"].get("ranks"):
        ranks = card["method_summary"]["ranks"]
        lines += [
            "LRPET ranks (the folded weights are exactly this rank):"
            if method["method"] == "lrpet"
            else "BSR ranks (the stable-rank penalty pulled each folded weight towards this rank):",
            "",
        ]
        lines += [f"- `{name}`: {rank}" for name, rank in ranks.items()]
        lines.append("")
    lines += ["Trained by `lrdeploy train`; the JSON card beside this file holds the full config.", ""]
    return "\n".join(lines)


def write_card(card: dict[str, Any], onnx_path: Path) -> tuple[Path, Path]:
    """Write both cards beside ``onnx_path``; return their paths."""
    json_path, md_path = card_paths(onnx_path)
    card = {"card_version": CARD_VERSION, **card}
    write_text_atomic(json_path, json.dumps(card, indent=2, sort_keys=False) + "\n")
    write_text_atomic(md_path, _markdown(card, onnx_path.name))
    return json_path, md_path
