"""Which LAPACK path a plan's SVD should take: time and accuracy of each way to get a weight's singular
values (a budget's allocation) and its top-r factors (a rank), against the planner's float64 Gram + eigh.

The weight is an LLM-shaped m×n matrix of random low-rank-plus-noise values (as `benchmarks/scale.py`
generates). Every method runs ``--repeats`` times side by side in one process on ``--threads`` BLAS
threads; the table gives the median seconds and, for factors, the relative Frobenius difference of the
rank-r product from the reference's (for values, the largest difference relative to σ_max).

    python benchmarks/spectrum_drivers.py --m 1600 --n 6400 --rank 400 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg as sl
from threadpoolctl import threadpool_limits

from lrdeploy.planning.spectrum import Spectrum


def _weight(m: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    core = 32
    left = rng.standard_normal((m, core), dtype=np.float32) * np.exp(-np.arange(core) / 8).astype(np.float32)
    w = left @ rng.standard_normal((core, n), dtype=np.float32) / np.sqrt(core)
    return ((w + 0.05 * rng.standard_normal((m, n), dtype=np.float32)) / np.sqrt(m)).astype(np.float32)


def _gram(w: np.ndarray, dtype=np.float64) -> np.ndarray:
    work = np.asarray(w, dtype=dtype)
    return work @ work.T


def _factors(w: np.ndarray, values: np.ndarray, basis: np.ndarray, rank: int) -> np.ndarray:
    """The rank-r product U_r U_rᵀ W from eigenvalues/eigenvectors of W Wᵀ in any order."""
    top = np.argsort(values)[::-1][:rank]
    u = np.asarray(basis[:, top], dtype=np.float64)
    return u @ (u.T @ np.asarray(w, dtype=np.float64))


def _values_methods(rank: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Singular values, descending."""

    def from_eigenvalues(e: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip(np.sort(np.asarray(e, dtype=np.float64))[::-1], 0, None))

    return {
        "values: Spectrum.of (Gram + eigh, float64; today's analysis)": lambda w: (
            Spectrum.of(w).singular_values
        ),
        "values: Spectrum.values_of (Gram + eigvalsh, float64)": lambda w: (
            Spectrum.values_of(w).singular_values
        ),
        "values: scipy eigh(evr, eigvals_only), float64 Gram": lambda w: from_eigenvalues(
            sl.eigh(_gram(w), eigvals_only=True, driver="evr")
        ),
        "values: eigvalsh of a float32 Gram": lambda w: from_eigenvalues(
            np.linalg.eigvalsh(_gram(w, np.float32))
        ),
        "values: scipy svdvals (gesdd) of the float32 weight": lambda w: sl.svdvals(w),
    }


def _factor_methods(rank: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The rank-r approximation of the weight."""

    def full(w: np.ndarray) -> np.ndarray:
        spectrum = Spectrum.of(w)
        a, b = spectrum.factors(w, rank)
        return a @ b

    def subset(driver: str, dtype) -> Callable[[np.ndarray], np.ndarray]:
        def run(w: np.ndarray) -> np.ndarray:
            m = w.shape[0]
            values, basis = sl.eigh(_gram(w, dtype), subset_by_index=[m - rank, m - 1], driver=driver)
            return _factors(w, values, basis, rank)

        return run

    def gesdd32(w: np.ndarray) -> np.ndarray:
        u, s, vt = sl.svd(w, full_matrices=False, lapack_driver="gesdd")
        return (u[:, :rank] * s[:rank]) @ vt[:rank]

    return {
        "factors: Spectrum.of + factors (Gram + eigh, float64; today's)": full,
        "factors: scipy eigh(evr, top r), float64 Gram": subset("evr", np.float64),
        "factors: scipy eigh(evx, top r), float64 Gram": subset("evx", np.float64),
        "factors: scipy eigh(evr, top r), float32 Gram": subset("evr", np.float32),
        "factors: scipy svd (gesdd) of the float32 weight": gesdd32,
    }


def _time(job: Callable[[np.ndarray], np.ndarray], w: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = job(w)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1600, help="rows (the smaller side)")
    parser.add_argument("--n", type=int, default=6400)
    parser.add_argument("--rank", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    args = parser.parse_args()
    w = _weight(args.m, args.n)
    print(
        f"# {args.m}×{args.n} float32 weight, rank {args.rank}, {args.threads} BLAS thread(s), median of "
        f"{args.repeats}; {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    print("| method | median s | difference from today's |\n|---|---|---|")
    with threadpool_limits(args.threads):
        reference = None
        for label, job in _values_methods(args.rank).items():
            seconds, values = _time(job, w, args.repeats)
            reference = values if reference is None else reference
            diff = float(np.max(np.abs(values - reference)) / reference[0])
            print(f"| {label} | {seconds:.2f} | {diff:.1e} of σ_max |", flush=True)
        reference = None
        for label, job in _factor_methods(args.rank).items():
            seconds, product = _time(job, w, args.repeats)
            reference = product if reference is None else reference
            diff = float(np.linalg.norm(product - reference) / np.linalg.norm(reference))
            print(f"| {label} | {seconds:.2f} | {diff:.1e} relative (rank-r product) |", flush=True)


if __name__ == "__main__":
    main()
