"""Run the original and the compressed model on the same inputs and measure how far apart they are.

Per output, over every batch: max |a − b|, relative L2 ‖a − b‖ / ‖a‖, cosine similarity, the worst
``|a − b| − rtol·|a|`` (the ``--atol/--rtol`` gate passes when it is ≤ atol, as ``numpy.allclose``), and
for outputs that look like class scores (float [batch, classes]): top-1 agreement (same argmax), top-5
agreement (the original's top-1 class is among the compressed model's top 5) and, with labels, the
accuracy of both models. Integer and boolean outputs (class ids from an ArgMax, masks) are categories, not
magnitudes: they get the fraction of equal elements instead of rel L2 and cosine, and an output of one id
per sample counts as top-1. Gates turn these numbers into pass/fail (`Gates.check`).

Without a gate the numbers still speak: `Verification.warning` names an output far from the original's
(cosine < 0.9 or rel L2 > 0.5, or NaN/inf where the original has numbers), and ``few_samples`` says that a
top-1 agreement over fewer than 100 samples is an anecdote, not a rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lrdeploy.errors import RuntimeFailure, UsageError, VerificationFailed
from lrdeploy.runtime.sessions import Device, make_session, release_memory, summarize
from lrdeploy.runtime.spool import KEEP_BYTES, Spool
from lrdeploy.spelling import either, option

__all__ = ["Gates", "OutputComparison", "Verification", "compare_models"]

Batch = tuple[Mapping[str, np.ndarray], np.ndarray | None]
#: Below this many samples a top-1 agreement is reported as a count, not a rate.
MIN_RATE_SAMPLES = 100
#: An output this far from the original's is flagged even with no gate set.
WARN_COSINE = 0.9
WARN_REL_L2 = 0.5


@dataclass(frozen=True)
class Gates:
    """Thresholds a verification must meet; None disables a gate."""

    atol: float | None = None
    rtol: float = 0.0
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        ranges = {"atol": (0, math.inf), "rtol": (0, math.inf), "max_rel_l2": (0, math.inf)}
        ranges |= {"min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:  # also refuses NaN
                bounds = f"≥ {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
                raise UsageError(f"{option(name)} must be {bounds}, got {value}")
        if self.rtol and self.atol is None:  # |Δ| ≤ atol + rtol·|ref| with atol 0: rtol alone is a gate
            object.__setattr__(self, "atol", 0.0)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.atol, self.max_rel_l2, self.min_cosine, self.min_top1))

    def failures(self, verification: Verification) -> list[str]:
        """One line per output and gate that failed."""
        failed = []
        for out in verification.outputs:
            if self.atol is not None and out.allclose_excess > self.atol:
                failed.append(
                    f"output '{out.name}' exceeds {option('atol', self.atol)}/{option('rtol', self.rtol)} "
                    f"(max |Δ| {out.max_abs_diff:.3g})"
                )
            if self.max_rel_l2 is not None and out.rel_l2 is not None and not out.rel_l2 <= self.max_rel_l2:
                failed.append(
                    f"output '{out.name}' rel L2 {out.rel_l2:.3g} > {option('max_rel_l2', self.max_rel_l2)}"
                )
            if self.min_cosine is not None and out.cosine is not None and not out.cosine >= self.min_cosine:
                failed.append(
                    f"output '{out.name}' cosine {out.cosine:.6f} < {option('min_cosine', self.min_cosine)}"
                )
            if (
                self.min_top1 is not None
                and out.top1_agreement is not None
                and out.top1_agreement < self.min_top1
            ):
                gate = option("min_top1", self.min_top1)
                failed.append(f"output '{out.name}' top-1 agreement {out.top1_agreement:.4f} < {gate}")
        return failed

    def check(self, verification: Verification) -> None:
        failed = self.failures(verification)
        if failed:
            more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
            raise VerificationFailed(f"verification failed: {failed[0]}{more}")


@dataclass
class _Accumulator:
    rtol: float
    shape: tuple[int, ...] = ()  # of the last batch
    low: tuple[int, ...] | None = None  # per dim, the smallest and largest over the batches
    high: tuple[int, ...] = ()
    max_abs: float = 0.0
    excess: float = -math.inf
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    new_sq: float = 0.0
    dot: float = 0.0
    top1: int = 0
    top5: int = 0
    correct_ref: int = 0
    correct_new: int = 0
    rows: int = 0
    labelled: int = 0
    class_scores: bool = True
    discrete: bool = False
    equal: int = 0
    elements: int = 0
    nonfinite: bool = False
    diverged: bool = False

    def add(self, ref: np.ndarray, new: np.ndarray, labels: np.ndarray | None) -> None:
        if ref.shape != new.shape:
            raise RuntimeFailure(
                f"output shapes differ: original {list(ref.shape)}, compressed {list(new.shape)}"
            )
        self.shape = ref.shape
        same_rank = self.low is not None and len(self.low) == ref.ndim
        self.low = tuple(map(min, self.low, ref.shape)) if same_rank else ref.shape  # type: ignore[arg-type]
        self.high = tuple(map(max, self.high, ref.shape)) if same_rank else ref.shape
        self.discrete = ref.dtype.kind not in "fc"
        same = np.asarray(ref == new, dtype=bool)
        self.equal += int(np.sum(same))
        self.elements += ref.size
        if ref.dtype.kind in "biuf":
            a = np.asarray(ref, dtype=np.float64)
            b = np.asarray(new, dtype=np.float64)
        else:  # strings, maps: only equality means anything, a mismatch counts as |Δ| = 1
            a, b = (~same).astype(np.float64), np.zeros(same.shape)
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        if not (finite_a.all() and finite_b.all()):
            self.nonfinite = True
            # NaN/inf where the original has a number (or another NaN/inf) is an infinite error; the same
            # NaN/inf in both (a masked score, say) is not, and the finite elements are compared as usual.
            consistent = np.array_equal(finite_a, finite_b) and np.array_equal(
                a[~finite_a], b[~finite_b], equal_nan=True
            )
            self.diverged |= not consistent
            both = finite_a & finite_b
            self._accumulate(a[both], b[both])
        else:
            self._accumulate(a, b)
        if self.discrete and ref.ndim == 1:  # one class id per sample
            self.top1 += int(np.sum(ref == new))
            self.rows += ref.shape[0]
            if labels is not None and len(labels) == ref.shape[0]:
                self.correct_ref += int(np.sum(ref == labels))
                self.correct_new += int(np.sum(new == labels))
                self.labelled += ref.shape[0]
        self.class_scores &= ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[1] >= 2
        if not self.class_scores:
            return
        ref_top1 = np.argmax(a, axis=1)
        self.top1 += int(np.sum(ref_top1 == np.argmax(b, axis=1)))
        if a.shape[1] >= 5:
            new_top5 = np.argpartition(-b, 4, axis=1)[:, :5]
            self.top5 += int(np.sum(np.any(new_top5 == ref_top1[:, None], axis=1)))
        self.rows += a.shape[0]
        if labels is not None and len(labels) == a.shape[0]:
            self.correct_ref += int(np.sum(ref_top1 == labels))
            self.correct_new += int(np.sum(np.argmax(b, axis=1) == labels))
            self.labelled += a.shape[0]

    def _accumulate(self, a: np.ndarray, b: np.ndarray) -> None:
        """Error sums over elements both models computed as numbers."""
        if self.diverged:
            self.max_abs, self.excess = math.inf, math.inf
        elif a.size:
            diff = np.abs(a - b)
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.excess = max(self.excess, float((diff - self.rtol * np.abs(a)).max()))
        self.diff_sq += float(np.sum((a - b) ** 2))
        self.ref_sq += float(np.sum(a * a))
        self.new_sq += float(np.sum(b * b))
        self.dot += float(np.sum(a * b))

    def finish(self, name: str) -> OutputComparison:
        rel_l2 = (
            math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq else (0.0 if not self.diff_sq else math.inf)
        )
        if self.ref_sq and self.new_sq:
            cosine = self.dot / math.sqrt(self.ref_sq * self.new_sq)
        else:
            cosine = 1.0 if self.ref_sq == self.new_sq else 0.0
        if self.diverged:
            rel_l2, cosine = math.nan, math.nan
        if self.discrete:
            rel_l2, cosine = None, None
        ids = self.discrete and len(self.shape) == 1
        scores = (self.class_scores or ids) and self.rows > 0
        five = scores and not ids and self.shape[1] >= 5
        labelled = scores and self.labelled > 0
        return OutputComparison(
            name=name,
            shape=tuple(
                lo if lo == hi else f"{lo}-{hi}" for lo, hi in zip(self.low or (), self.high, strict=True)
            ),
            max_abs_diff=self.max_abs,
            allclose_excess=self.excess if self.excess > -math.inf else 0.0,
            rel_l2=rel_l2,
            cosine=cosine,
            exact_match=self.equal / self.elements if self.discrete and self.elements else None,
            nonfinite=self.nonfinite,
            top1_agreement=self.top1 / self.rows if scores else None,
            top5_agreement=self.top5 / self.rows if five else None,
            accuracy_original=self.correct_ref / self.labelled if labelled else None,
            accuracy_compressed=self.correct_new / self.labelled if labelled else None,
        )


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int | str, ...]  # a dim that differs between batches (the last is short) is "8-32"
    max_abs_diff: float
    allclose_excess: float
    rel_l2: float | None  # None for integer/boolean outputs
    cosine: float | None
    top1_agreement: float | None
    top5_agreement: float | None
    accuracy_original: float | None
    accuracy_compressed: float | None
    exact_match: float | None = None  # fraction of equal elements, integer/boolean/string outputs only
    nonfinite: bool = False  # NaN or inf in either model's output (rel L2 and cosine are then NaN)


@dataclass(frozen=True)
class Verification:
    """Per-output comparisons; the headline numbers are the worst over the outputs."""

    provider: str
    outputs: tuple[OutputComparison, ...]
    samples: int
    data: str
    note: str | None = None

    @property
    def max_abs_diff(self) -> float:
        """Over the floating-point outputs: a flipped class id is not a numeric error of 9."""
        numeric = [o.max_abs_diff for o in self.outputs if o.rel_l2 is not None]
        return max(numeric or [o.max_abs_diff for o in self.outputs], default=0.0)

    @property
    def rel_l2(self) -> float | None:
        values = [o.rel_l2 for o in self.outputs if o.rel_l2 is not None]
        return max(values, key=_nan_worst) if values else None

    @property
    def cosine(self) -> float | None:
        values = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(values, key=lambda v: -math.inf if math.isnan(v) else v) if values else None

    def _worst(self, field: str) -> float | None:
        values = [getattr(o, field) for o in self.outputs if getattr(o, field) is not None]
        return min(values) if values else None

    @property
    def top1_agreement(self) -> float | None:
        return self._worst("top1_agreement")

    @property
    def top5_agreement(self) -> float | None:
        return self._worst("top5_agreement")

    @property
    def scored(self) -> OutputComparison | None:
        """The first output with accuracies against labels."""
        return next((o for o in self.outputs if o.accuracy_original is not None), None)

    @property
    def accuracy_original(self) -> float | None:
        return self.scored.accuracy_original if self.scored else None

    @property
    def accuracy_compressed(self) -> float | None:
        return self.scored.accuracy_compressed if self.scored else None

    @property
    def nonfinite(self) -> bool:
        return any(o.nonfinite for o in self.outputs)

    @property
    def few_samples(self) -> bool:
        """A top-1 agreement (or accuracy) measured on fewer than `MIN_RATE_SAMPLES` samples."""
        return self.top1_agreement is not None and self.samples < MIN_RATE_SAMPLES

    @property
    def warning(self) -> str | None:
        """Why the compressed model's outputs look wrong, even when no gate is set; None when they don't."""
        far = []
        for out in self.outputs:
            if out.rel_l2 is None or out.cosine is None:
                continue
            if math.isnan(out.rel_l2) or math.isnan(out.cosine):
                far.append(f"output '{out.name}' has NaN/inf where the original has numbers")
            elif out.cosine < WARN_COSINE or out.rel_l2 > WARN_REL_L2:
                far.append(
                    f"output '{out.name}' is far from the original's (cosine {out.cosine:.3f}, "
                    f"rel L2 {out.rel_l2:.3g})"
                )
        if not far:
            return None
        more = f" (+{len(far) - 1} more)" if len(far) > 1 else ""
        return f"{far[0]}{more}; check the model before use, or compress less"

    def to_dict(self) -> dict:
        """The JSON form: every key is also an attribute of the same name."""
        return {
            "provider": self.provider,
            "data": self.data,
            "samples": self.samples,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "rel_l2": _json_float(self.rel_l2),
            "cosine": _json_float(self.cosine),
            "nonfinite": self.nonfinite,
            "top1_agreement": self.top1_agreement,
            "top5_agreement": self.top5_agreement,
            "accuracy_original": self.accuracy_original,
            "accuracy_compressed": self.accuracy_compressed,
            "few_samples": self.few_samples,
            "warning": self.warning,
            "note": self.note,
            "outputs": [
                {k: _json_float(v) for k, v in asdict(o).items()} | {"shape": list(o.shape)}
                for o in self.outputs
            ],
        }


def _nan_worst(value: float) -> float:
    """Sort key under which NaN ranks as the worst (largest) error."""
    return math.inf if math.isnan(value) else value


def _json_float(value):
    """Strict JSON has no NaN/Infinity: write them as null (``nonfinite`` says why)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _run(session, feeds: Mapping[str, np.ndarray], label: str, names=None) -> list[np.ndarray]:
    """The outputs in the order of ``names`` (default: the session's own)."""
    try:
        return session.run(names, dict(feeds))
    except Exception as error:
        raise RuntimeFailure(f"onnxruntime failed to run the {label} model: {summarize(error)}") from None


def _open_original(source: bytes | Path, device: Device):
    try:
        return make_session(source, device, label="the original model")
    except RuntimeFailure as error:  # nothing to compare against on this device
        skip = either("compress --no-verify", "compress(verify=False)")
        raise RuntimeFailure(f"{error} ({skip} skips verification)") from None


def _interface(session) -> tuple[list[str], list[str]]:
    return [v.name for v in session.get_inputs()], [v.name for v in session.get_outputs()]


def _same_interface(reference: tuple[list[str], list[str]], candidate) -> None:
    for kind, ours, theirs in zip(("inputs", "outputs"), reference, _interface(candidate), strict=True):
        if sorted(ours) != sorted(theirs):
            raise UsageError(
                f"the two models have different {kind} (original {ours}, compressed {theirs}); verify "
                "compares a model with its compression"
            )


def _samples(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def compare_models(
    original: bytes | Path,
    compressed: bytes | Path,
    batches: Iterable[Batch],
    device: Device,
    *,
    data: str = "random",
    rtol: float = 0.0,
    progress: Callable[[int], None] | None = None,
    keep_bytes: int = KEEP_BYTES,
) -> Verification:
    """Run the original on every (feeds, labels) batch, then the compressed model, and compare each output.

    onnxruntime holds one model at a time: the feeds and the original's outputs are kept (in memory up to
    ``keep_bytes``, then in temporary files, `Spool`) and its session is released before the compressed
    model's opens. Only when those files cannot be written do the two run side by side, and the result's
    note says so. ``progress`` gets each batch's sample count once per model run.
    """
    release_memory()  # what compression freed but the allocator kept: often more than the output's size
    reference = _open_original(original, device)
    interface = _interface(reference)
    names = interface[1]
    accumulators = {name: _Accumulator(rtol) for name in names}
    samples, note, pending = 0, device.note, None
    batches = iter(batches)
    with Spool(keep_bytes) as spool:
        for feeds, labels in batches:
            expected = _run(reference, feeds, "original")
            samples += _samples(feeds)
            if progress:
                progress(_samples(feeds))
            try:
                spool.append([labels, list(feeds), *feeds.values(), *expected])
            except OSError as error:  # no room to set the outputs aside: compare with both models open
                pending = feeds, labels, expected
                why = f"could not keep the original's outputs on disk ({error.strerror or error})"
                note = "; ".join(filter(None, (note, f"{why}: both models were loaded at once")))
                break
        if samples == 0:
            raise UsageError(f"the data ({data}) has no samples; give a data set with at least one")
        if pending is None:
            del reference
            release_memory()
        candidate = make_session(compressed, device, label="the compressed model")
        _same_interface(interface, candidate)
        for labels, keys, *arrays in spool.drain():
            feeds = dict(zip(keys, arrays[: len(keys)], strict=True))
            actual = _run(candidate, feeds, "compressed", names)
            _add(accumulators, arrays[len(keys) :], actual, labels)
            if progress:
                progress(_samples(feeds))
    if pending is not None:
        feeds, labels, expected = pending
        _add(accumulators, expected, _run(candidate, feeds, "compressed", names), labels)
        if progress:
            progress(_samples(feeds))
        for feeds, labels in batches:
            expected = _run(reference, feeds, "original")
            _add(accumulators, expected, _run(candidate, feeds, "compressed", names), labels)
            samples += _samples(feeds)
            if progress:
                progress(2 * _samples(feeds))
    outputs = tuple(acc.finish(name) for name, acc in accumulators.items())
    return Verification(device.provider, outputs, samples, data, note)


def _add(accumulators: dict[str, _Accumulator], expected, actual, labels: np.ndarray | None) -> None:
    for accumulator, ref, new in zip(accumulators.values(), expected, actual, strict=True):
        accumulator.add(np.asarray(ref), np.asarray(new), labels)
