"""``lrdeploy env``: what a bug report needs — versions, providers, and whether CUDA really starts."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

__all__ = ["collect"]

_PACKAGES = (
    "lrdeploy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx-graphsurgeon",
    "numpy",
    "typer",
    "rich",
    "torch",
    "matplotlib",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listing.stdout.splitlines() if line.strip()]


def collect() -> dict[str, object]:
    """Versions, providers and the CUDA/TensorRT probe results, without importing torch."""
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "gpus": _gpus(),
    }
    if _version("onnxruntime-gpu") and _version("onnxruntime"):
        info["warning"] = (
            "both onnxruntime and onnxruntime-gpu are installed; uninstall one (they share a module)"
        )
    try:
        import onnxruntime
    except ImportError:
        info["onnxruntime"] = "not importable: pip install 'lrdeploy[cpu]' or 'lrdeploy[gpu]'"
        return info
    from lrdeploy.runtime.sessions import CUDA, TENSORRT, probe_provider

    providers = onnxruntime.get_available_providers()
    info["onnxruntime_providers"] = providers
    info["onnxruntime_device"] = onnxruntime.get_device()
    for label, provider in (("cuda", CUDA), ("tensorrt", TENSORRT)):
        if provider in providers:
            reason = probe_provider(provider)
            info[f"{label}_runs"] = "yes" if reason is None else f"no: {reason}"
        else:
            info[f"{label}_runs"] = "no: not in this onnxruntime build"
    return info
