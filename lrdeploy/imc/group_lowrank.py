"""Group low-rank convolution (Jeon, Rhe, Ko, DATE 2025): factorize a conv weight per group of input
channels. Pure numpy; not wired into the graph passes yet.

Split the (BN-folded) weight W [Cout, Cin, *k], seen as the matrix [Cout, Cin·Πk], along input channels
into G blocks W_g [Cout, (Cin/G)·Πk] and truncate each block's SVD on its own, W_g ≈ U_g Σ_g V_gᵀ at
rank r. As ONNX this is two standard Conv nodes:

- a grouped k×k Conv (group G, G·r outputs): filters g·r … g·r+r−1 are Σ_g^½ V_gᵀ reshaped
  [r, Cin/G, *k] and read only group g's input channels;
- a 1×1 Conv (G·r → Cout) with weight [U_1 Σ_1^½ | … | U_G Σ_G^½].

Their product is Ŵ = [Û_1 … Û_G] block by block, so the pair computes the conv with Ŵ. At full rank
(r = min(Cout, (Cin/G)·Πk)) each block is exact. Parameters: r·(Cin·Πk + G·Cout), against
r·(Cin·Πk + Cout) for plain low rank at rank r.

Theorem 1 of the paper: at the same rank r per group the error is no larger than plain low rank's.
Proof: the plain rank-r approximation A restricted to group g's columns has rank ≤ r, so by
Eckart–Young ‖W_g − Ŵ_g‖_F ≤ ‖W_g − A_g‖_F; summing the squares over the groups gives
‖W − Ŵ‖_F ≤ ‖W − A‖_F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GroupFactors", "group_factorize", "plain_error"]


@dataclass(frozen=True)
class GroupFactors:
    """The two Conv weights: ``first`` [G·r, Cin/G, *k] (group G), ``second`` [Cout, G·r, 1, …]."""

    first: np.ndarray
    second: np.ndarray
    groups: int
    rank: int

    @property
    def params(self) -> int:
        return self.first.size + self.second.size

    def reconstruct(self) -> np.ndarray:
        """Ŵ [Cout, Cin, *k]: the single conv the pair computes."""
        g, r = self.groups, self.rank
        cout = self.second.shape[0]
        second = self.second.reshape(cout, g, r)
        first = self.first.reshape(g, r, -1)
        blocks = [second[:, index] @ first[index] for index in range(g)]  # each [Cout, (Cin/G)·Πk]
        kernel = self.first.shape[2:]
        return np.concatenate([b.reshape(cout, -1, *kernel) for b in blocks], axis=1)


def _check(weight: np.ndarray, groups: int, rank: int) -> None:
    if weight.ndim < 3:
        raise ValueError(f"a conv weight [Cout, Cin, *k] has 3 or more dims, got shape {weight.shape}")
    if groups < 1 or weight.shape[1] % groups:
        raise ValueError(f"groups {groups} must divide the {weight.shape[1]} input channels")
    if rank < 1:
        raise ValueError(f"rank {rank} must be at least 1")


def group_factorize(weight: np.ndarray, groups: int, rank: int) -> GroupFactors:
    """Per-group truncated SVD at ``rank`` (capped at each block's full rank, then zero-padded to
    ``rank`` so that every group has the same width)."""
    _check(weight, groups, rank)
    cout, cin = weight.shape[:2]
    kernel = weight.shape[2:]
    width = cin // groups
    matrix = np.asarray(weight, dtype=np.float64).reshape(cout, cin, -1)
    first = np.zeros((groups, rank, width * math.prod(kernel)))
    second = np.zeros((cout, groups, rank))
    for g in range(groups):
        block = matrix[:, g * width : (g + 1) * width].reshape(cout, -1)
        u, s, vt = np.linalg.svd(block, full_matrices=False)
        keep = min(rank, len(s))
        root = np.sqrt(s[:keep])
        first[g, :keep] = root[:, None] * vt[:keep]
        second[:, g, :keep] = u[:, :keep] * root
    dtype = weight.dtype if np.issubdtype(weight.dtype, np.floating) else np.float64
    return GroupFactors(
        first.reshape(groups * rank, width, *kernel).astype(dtype),
        second.reshape(cout, groups * rank, *([1] * len(kernel))).astype(dtype),
        groups,
        rank,
    )


def plain_error(weight: np.ndarray, rank: int) -> float:
    """‖W − A‖_F for the best rank-``rank`` A of W as [Cout, Cin·Πk] (Eckart–Young: the tail σ's)."""
    s = np.linalg.svd(np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))
