"""The compression config: one frozen, validated object the CLI builds from flags and the API accepts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from lrdeploy.errors import UsageError
from lrdeploy.planning.costmodels import COSTS
from lrdeploy.planning.policy import Energy, FixedRank, RankPolicy, RankRatio, number
from lrdeploy.runtime.datasets import InMemoryData, as_data_source
from lrdeploy.runtime.verification import VerifyConfig, is_int
from lrdeploy.spelling import option

__all__ = ["ALLOCATORS", "METHODS", "CompressConfig", "load_overrides", "parse_input_shapes"]

_VERIFY_FIELDS = set(VerifyConfig.__dataclass_fields__)
METHODS = ("auto", "svd", "whiten")
PRECISIONS = ("fp32", "fp16")
ALLOCATORS = ("error", "sensitivity")


@dataclass(frozen=True)
class CompressConfig:
    """How to compress.

    ``include``/``exclude`` are shell-style patterns (fnmatch) on a layer's node name, weight names and
    module scopes (`planning.selection`); ``overrides`` maps such a name or pattern to a rank and wins
    over the policy and the patterns. With no policy, only overridden layers
    are factorized. ``verification`` says how the result is checked; when its gates fail the output is
    not written unless ``keep_failed``.

    Budgets (`planning.budget`): ``target_params`` or ``target_macs``, a fraction of the original model,
    replaces the rank policy; ranks are allocated across layers by ``allocate`` ("error": each layer's
    normalized truncation error; "sensitivity": measured end to end). ``calib`` (the sources ``data``
    takes; images use the verification's image options) gives each layer's input statistics; ``method``
    "whiten" then fits data-aware factors ("auto": whiten when ``calib`` is given). ``calib_samples``
    caps the samples read, ``calib_holdout`` is the share held apart from fitting.
    """

    policy: RankPolicy | None = None
    rank_multiple: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, int] = field(default_factory=dict)
    fold_bn: bool = True
    verify: bool = True
    verification: VerifyConfig = field(default_factory=VerifyConfig)
    keep_failed: bool = False
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    target_params: float | None = None
    target_macs: float | None = None
    cost: str | None = None
    target: float | None = None
    allocate: str = "error"
    method: str = "auto"
    calib: str | InMemoryData | None = None  # also accepts a Path, an array or {input: array}
    calib_samples: int = 256
    calib_holdout: float = 0.2
    groups: int = 1  # group low rank: each group-1 Conv factorized per group of input channels
    imc_array: str | tuple[int, int] | None = None  # crossbar ROWSxCOLS: IMC costs and the report's table
    imc_mapping: str = "im2col"
    # Latency (`lrdeploy.runtime.latency`) and the deployed precision (`lrdeploy.runtime.precision`)
    target_latency: float | None = None  # ≡ cost="latency", target=F
    latency_table: str | Path | None = None
    latency_batch: int = 1
    threads: int | None = None
    precision: str = "fp32"
    quantize: str | None = None
    int8_middle: str = "int8"  # a pair's rank-r middle tensor under quantize int8: int8 or int16
    requantize: bool = False  # factorize int8 weights behind DequantizeLinear, re-quantizing the factors

    def __post_init__(self) -> None:
        self._check_latency()
        self._check_budget()
        self._check_imc()
        if not is_int(self.rank_multiple) or self.rank_multiple < 1:
            raise UsageError(f"rank multiple must be a positive integer, got {self.rank_multiple!r}")
        for name, rank in self.overrides.items():
            if not is_int(rank) or rank < 1:
                raise UsageError(f"override for '{name}' must be a positive integer rank, got {rank!r}")
        for name, dims in self.input_shapes.items():
            if not all(is_int(d) and d >= 1 for d in dims):
                raise UsageError(f"input shape for '{name}' must be positive integers, got {list(dims)}")
        if self.policy is None and not self.overrides and self.budget is None:
            names = ("rank_ratio", "energy", "rank", "target_params", "target_macs")
            raise UsageError(
                f"choose a rank policy: {', '.join(option(n) for n in names)} (or give {option('overrides')})"
            )
        if not self.verify and self.verification.gates.active:
            raise UsageError(
                f"verification gates need verification: drop {option('verify', False)} or the gate options"
            )
        for name in ("include", "exclude"):  # one pattern given as a string is one pattern, not its letters
            patterns = getattr(self, name)
            object.__setattr__(self, name, (patterns,) if isinstance(patterns, str) else tuple(patterns))
        object.__setattr__(self, "rank_multiple", int(self.rank_multiple))
        object.__setattr__(
            self, "overrides", MappingProxyType({k: int(v) for k, v in self.overrides.items()})
        )
        shapes = {k: tuple(int(d) for d in v) for k, v in self.input_shapes.items()}
        object.__setattr__(self, "input_shapes", MappingProxyType(shapes))

    def _check_budget(self) -> None:
        targets = {
            "target_params": self.target_params,
            "target_macs": self.target_macs,
            "target": self.target,
        }
        given = {k: v for k, v in targets.items() if v is not None}
        if len(given) > 1:
            latency = self.target_latency is not None  # it was spelled target_latency, not target
            said = ["target_latency" if k == "target" and latency else k for k in given]
            raise UsageError(f"give only one of {', '.join(option(k) for k in said)}")
        for name, value in given.items():
            value = number(value, option(name))
            if not 0.0 < value <= 1.0:
                raise UsageError(f"{option(name)} must be a fraction of the model in (0, 1], got {value:g}")
            object.__setattr__(self, name, value)
        self._check_cost(next(iter(given), None))
        if given and self.policy is not None:
            raise UsageError(
                f"{option(next(iter(given)))} chooses every rank itself; drop "
                f"{option('rank_ratio')}/{option('energy')}/{option('rank')}"
            )
        if self.allocate not in ALLOCATORS:
            raise UsageError(f"{option('allocate')} must be error or sensitivity, got {self.allocate!r}")
        if self.method not in METHODS:
            raise UsageError(f"{option('method')} must be auto, svd or whiten, got {self.method!r}")
        try:
            object.__setattr__(self, "calib", as_data_source(self.calib))
        except UsageError as error:
            raise UsageError(str(error).replace("data must", f"{option('calib')} must", 1)) from None
        if self.calib == "random":
            raise UsageError(f"{option('calib')} needs real data; random inputs say nothing about a model")
        if self.method == "whiten" and self.calib is None:
            raise UsageError(f"{option('method', 'whiten')} needs calibration data: add {option('calib')}")
        if self.allocate == "sensitivity" and (self.calib is None or not given):
            raise UsageError(
                f"{option('allocate')} sensitivity measures layers on calibration data for a budget: "
                f"give {option('calib')} and {option('target_macs')} or {option('target_params')}"
            )
        if not is_int(self.calib_samples) or self.calib_samples < 1:
            raise UsageError(
                f"{option('calib_samples')} must be a positive integer, got {self.calib_samples!r}"
            )
        holdout = number(self.calib_holdout, option("calib_holdout"))
        if not 0.0 <= holdout <= 0.5:
            raise UsageError(f"{option('calib_holdout')} must be in [0, 0.5], got {holdout:g}")
        object.__setattr__(self, "calib_holdout", holdout)

    def _check_imc(self) -> None:
        """``groups`` a positive integer; ``imc_array`` parsed (``RxC``), and required by the IMC costs."""
        if not is_int(self.groups) or self.groups < 1:
            raise UsageError(f"{option('groups')} must be a positive integer, got {self.groups!r}")
        object.__setattr__(self, "groups", int(self.groups))
        from lrdeploy.imc.mapping import MAPPINGS, parse_array

        if self.imc_mapping not in MAPPINGS:
            raise UsageError(
                f"{option('imc_mapping')} must be one of {', '.join(MAPPINGS)}, got {self.imc_mapping!r}"
            )
        if self.imc_array is not None:
            try:
                array = parse_array(self.imc_array)
            except UsageError as error:
                raise UsageError(f"{option('imc_array')}: {error}") from None
            object.__setattr__(self, "imc_array", f"{array.rows}x{array.cols}")
        elif self.cost is not None and self.cost.startswith("imc-"):
            raise UsageError(
                f"{option('cost')} {self.cost} needs the crossbar size: add {option('imc_array')} RxC"
            )

    def _check_latency(self) -> None:
        """``target_latency`` is ``cost="latency"`` with ``target``; the deployed precision; and GPU ranks
        rounded for tensor cores (fp16 and latency: 8, int8: 16) unless ``rank_multiple`` says otherwise."""
        if self.target_latency is not None:
            if self.target is not None or self.cost not in (None, "latency"):
                raise UsageError(
                    f"{option('target_latency')} is {option('cost')} latency {option('target')} F: "
                    "give only one of them"
                )
            object.__setattr__(self, "cost", "latency")
            object.__setattr__(self, "target", self.target_latency)
        if self.precision not in PRECISIONS:
            raise UsageError(f"{option('precision')} must be fp32 or fp16, got {self.precision!r}")
        if self.quantize not in (None, "int8"):
            raise UsageError(f"{option('quantize')} must be int8, got {self.quantize!r}")
        if self.quantize is not None and self.precision != "fp32":
            raise UsageError(f"give {option('precision')} fp16 or {option('quantize')} int8, not both")
        if self.quantize is not None and self.calib is None:
            raise UsageError(f"{option('quantize')} int8 calibrates activations: add {option('calib')}")
        if self.int8_middle not in ("int8", "int16"):
            raise UsageError(f"{option('int8_middle')} must be int8 or int16, got {self.int8_middle!r}")
        if self.int8_middle != "int8" and self.quantize is None:
            raise UsageError(f"{option('int8_middle')} applies to {option('quantize')} int8: add it")
        for name in ("latency_batch", "threads"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise UsageError(f"{option(name)} must be a positive integer, got {value!r}")
        latency = self.cost == "latency"
        if (self.latency_table is not None or self.threads is not None) and not latency:
            raise UsageError(f"{option('latency_table')}/{option('threads')} need {option('cost')} latency")
        gpu = self.verification.device in ("cuda", "tensorrt")
        if gpu and self.rank_multiple == 1 and (latency or self.precision == "fp16" or self.quantize):
            object.__setattr__(self, "rank_multiple", 16 if self.quantize else 8)

    def _check_cost(self, target: str | None) -> None:
        """The cost a budget is counted in: ``target_params``/``target_macs`` name theirs, ``target``
        needs ``cost`` (one of `costmodels.COSTS`)."""
        if self.cost is None:
            if target == "target":
                names = ", ".join(COSTS)
                raise UsageError(f"{option('target')} needs {option('cost')} (one of {names})")
            return
        if self.cost not in COSTS:
            raise UsageError(f"{option('cost')} must be one of {', '.join(COSTS)}, got {self.cost!r}")
        implied = {"target_params": "params", "target_macs": "macs"}.get(target or "")
        if target is None:
            raise UsageError(f"{option('cost')} {self.cost} needs a budget: add {option('target')} F")
        if implied is not None and implied != self.cost and self.cost != "latency":  # latency may constrain
            raise UsageError(
                f"{option(target)} counts {implied}, not {self.cost}: use {option('target')} F instead"  # type: ignore[arg-type]
            )

    @property
    def budget(self) -> tuple[str, float] | None:
        """(cost name, fraction) when a whole-model budget is set."""
        if self.target_params is not None:
            return "params", self.target_params
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target is not None and self.cost is not None:
            return self.cost, self.target
        return None

    @property
    def whiten(self) -> bool:
        """Whitened factors: asked for, or "auto" with calibration data."""
        return self.method == "whiten" or (self.method == "auto" and self.calib is not None)

    @classmethod
    def build(
        cls,
        *,
        rank_ratio: float | None = None,
        energy: float | None = None,
        rank: int | None = None,
        **options: object,
    ) -> CompressConfig:
        """Pick the policy from at most one of ``rank_ratio``, ``energy``, ``rank``.

        Keywords naming `VerifyConfig` fields (``device``, ``data``, ``gates``, ``seed``, ...) go there.
        """
        verify_options = {k: options.pop(k) for k in list(options) if k in _VERIFY_FIELDS}
        if verify_options:
            base = options.pop("verification", None) or VerifyConfig()
            options["verification"] = base.with_(**verify_options)  # type: ignore[union-attr]
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown compress option(s): {', '.join(sorted(unknown))}")
        chosen = [p for p in (rank_ratio, energy, rank) if p is not None]
        if len(chosen) > 1:
            raise UsageError(f"give only one of {option('rank_ratio')}, {option('energy')}, {option('rank')}")
        policy: RankPolicy | None = None
        if rank_ratio is not None:
            policy = RankRatio(rank_ratio)
        elif energy is not None:
            policy = Energy(energy)
        elif rank is not None:
            policy = FixedRank(rank)
        return cls(policy=policy, **options)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """What decides the output model (for provenance); verification settings are left out."""
        return {
            "policy": self.policy.describe() if self.policy else None,
            "rank_multiple": self.rank_multiple,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": dict(self.overrides),
            "fold_bn": self.fold_bn,
            "requantize": self.requantize,
            "target": dict([self.budget]) if self.budget else None,
            "allocate": self.allocate if self.budget else None,
            "method": "whiten" if self.whiten else "svd",
            "calib": str(self.calib) if self.calib is not None else None,
            "calib_samples": self.calib_samples if self.calib is not None else None,
            "calib_holdout": self.calib_holdout if self.calib is not None else None,
            "groups": self.groups,
            "imc_array": self.imc_array,
            "imc_mapping": self.imc_mapping if self.imc_array else None,
            "latency": {"batch": self.latency_batch, "threads": self.threads}
            if self.cost == "latency"
            else None,
            "precision": self.quantize or self.precision,
            "int8_middle": self.int8_middle if self.quantize else None,
        }

    def describe(self) -> str:
        if self.budget:
            kind, fraction = self.budget
            parts = [f"{fraction:g} of the {kind}, allocated by {self.allocate}"]
        else:
            parts = [self.policy.describe()] if self.policy else ["overrides only"]
        if self.whiten:
            parts.append("whitened factors")
        if self.rank_multiple > 1:
            parts.append(f"multiple of {self.rank_multiple}")
        if self.groups > 1:
            parts.append(f"group low rank, {self.groups} groups")
        if self.cost == "latency" and self.budget and self.budget[0] != "latency":
            parts.append("no layer slower than dense")
        if self.quantize or self.precision != "fp32":
            parts.append(f"deployed as {self.quantize or self.precision}")
        return ", ".join(parts)


def load_overrides(path: Path | str) -> dict[str, int]:
    """Read a per-layer rank file: a JSON object ``{"layer or glob": rank}`` (`planning.selection`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"overrides file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(
            f'overrides file {path} is not valid JSON ({error}); expected {{"layer": rank}}'
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f'overrides file {path} must hold a JSON object {{"layer": rank}}')
    return data


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:d0,d1,...`` strings (the name may itself contain ':')."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise UsageError(f"--input-shape expects NAME:d0,d1,... with positive dims, got '{spec}'")
        shapes[name] = shape
    return shapes
