"""The latency table on disk: measured layers and dense models of one environment, as validated JSON.

One file per environment (EP, onnxruntime version, CPU/GPU name, threads, batch, dtype, EP settings) in
``$LRDEPLOY_CACHE/latency/`` or ``~/.cache/lrdeploy/latency/``, or the file ``latency_table`` names (a
table measured on the target, used on a build box). Files are untrusted input: every number is checked,
and anything wrong is one line naming the file. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lrdeploy.errors import UsageError
from lrdeploy.runtime.bench import BenchConfig
from lrdeploy.runtime.sessions import Device
from lrdeploy.spelling import option

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig

__all__ = ["SCHEMA", "LatencyTable", "LayerTiming", "digest", "environment", "table_for"]

SCHEMA = 1


@dataclass(frozen=True)
class LayerTiming:
    """A layer's dense median and its pair's medians at the measured ranks (ms)."""

    dense: float
    ranks: tuple[int, ...]
    pairs: tuple[float, ...]

    def at(self, rank: int | None) -> float:
        if rank is None or not self.ranks:
            return self.dense
        return float(np.interp(rank, self.ranks, self.pairs))

    def to_dict(self) -> dict[str, object]:
        return {
            "dense_ms": self.dense,
            "pairs_ms": {str(r): t for r, t in zip(self.ranks, self.pairs, strict=True)},
        }


def cache_dir() -> Path:
    root = os.environ.get("LRDEPLOY_CACHE")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "lrdeploy" / "latency"


def _device_name(device: Device) -> str:
    if device.name != "cpu":
        from lrdeploy.runtime.envinfo import _gpus

        return ", ".join(_gpus()) or "unknown GPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Device, bench: BenchConfig, dtype: str) -> dict[str, object]:
    import onnxruntime

    settings = dict(device.providers[0][1])
    return {
        "ep": device.provider,
        "onnxruntime": onnxruntime.__version__,
        "device": _device_name(device),
        "threads": bench.threads,
        "batch": bench.batch_sizes[0],
        "dtype": dtype,
        "settings": {k: str(v) for k, v in sorted(settings.items())},
    }


def digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class LatencyTable:
    """Measured layers (by signature) and dense models (by digest) in one environment."""

    environment: dict[str, object]
    layers: dict[str, LayerTiming] = field(default_factory=dict)
    models: dict[str, float] = field(default_factory=dict)
    changed: bool = False

    def to_json(self) -> str:
        layers = {key: timing.to_dict() for key, timing in sorted(self.layers.items())}
        document = {
            "schema": SCHEMA,
            "environment": self.environment,
            "layers": layers,
            "models": self.models,
        }
        return json.dumps(document, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> LatencyTable:
        """A table file, validated; anything wrong is one UsageError line naming the file."""
        hint = f"measure it again with {option('latency_table')} pointing at a new file"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"latency table {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"latency table {path} is not valid JSON ({str(error)[:80]}); {hint}") from None
        try:
            return cls._parse(data)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise UsageError(f"latency table {path} is malformed ({str(error)[:100]}); {hint}") from None

    @classmethod
    def _parse(cls, data: object) -> LatencyTable:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"schema {found!r}, expected {SCHEMA}")
        environment, layers, models = data["environment"], data["layers"], data["models"]
        if not isinstance(environment, dict) or not isinstance(layers, dict) or not isinstance(models, dict):
            raise TypeError("environment, layers and models must be objects")
        table = cls(dict(environment))
        for key, entry in layers.items():
            pairs = sorted((int(r), _milliseconds(t)) for r, t in entry["pairs_ms"].items())
            if any(r < 1 for r, _ in pairs):
                raise ValueError(f"layer {key[:12]}: ranks must be ≥ 1")
            ranks = tuple(r for r, _ in pairs)
            table.layers[str(key)] = LayerTiming(
                _milliseconds(entry["dense_ms"]), ranks, tuple(t for _, t in pairs)
            )
        table.models = {str(k): _milliseconds(v) for k, v in models.items()}
        return table


def _milliseconds(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"a latency must be a positive number of ms, got {value!r}")
    return float(value)


def write_atomically(path: Path, text: str) -> None:
    """Atomically: a partial table is never read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def table_for(config: CompressConfig, environment: dict[str, object]) -> tuple[LatencyTable, Path, bool]:
    """(table, where it is saved, whether it was measured here): the named file or this machine's cache."""
    if config.latency_table is not None:
        path = Path(config.latency_table)
        if path.exists():
            table = LatencyTable.read(path)
            return table, path, table.environment == environment
        return LatencyTable(environment), path, True
    path = cache_dir() / f"{digest(environment)}.json"
    if path.exists():
        try:
            table = LatencyTable.read(path)
        except UsageError:  # a damaged cache is measured again, not an error
            table = LatencyTable(environment)
        if table.environment == environment:
            return table, path, True
    return LatencyTable(environment), path, True
