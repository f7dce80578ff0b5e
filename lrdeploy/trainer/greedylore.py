"""GreedyLore as a DDP communication hook: a greedy low-rank gradient compressor with error feedback.

Chen, He, Li, Jia, Yuan 2025, "Greedy Low-Rank Gradient Compression for Distributed Learning with Convergence
Guarantees" (arXiv:2507.08784). Per gradient matrix G_i of worker i (conv grads as [C_out, C_in·kh·kw]),
oriented so that Y_i is k × L with k = min(n, m) ≤ L = max(n, m):

    Y_i   = G_i + E_i                   error compensation: E_i is what worker i has not sent yet
    B                                   k × k orthonormal basis, the same on every worker, updated lazily
    C_i   = Bᵀ Y_i                      coefficients of every basis direction (k × L, local)
    S     = top-r of e_j                e_j: energy of direction j, all-reduced (so S is the same everywhere)
    Ŷ_i   = B_S C_i[S]                  the compressed gradient; workers all-reduce C_i[S] (r × L)
    E_i  ← Y_i − Ŷ_i                    error feedback: exactly the residual, carried to the next step
    step with mean_i Ŷ_i = B_S mean_i C_i[S]

The semi-lazy update: the basis is lazy, the r directions taken from it are chosen greedily at every step.
As S are the r of k orthonormal directions with the most energy, the compressor keeps at least r/k of
Σ_i ‖Y_i‖² however stale B is (contractive at every step, unlike a GaLore-style frozen rank-r subspace); at
r = k it is the identity, so it equals plain all-reduce.

How B is refreshed (``refresh``): ``"mean"``, the paper's, is U of svd(mean_i Y_i) every τ steps; that step
sends the whole matrix. ``"gram"`` (default) takes the eigenvectors of mean_i Y_i Y_iᵀ: one all-reduce of
the k(k+1)/2 numbers of a symmetric k × k matrix, and the step still sends r rows; its eigenvalues are the
energies of its directions, so no other message is needed to choose S. Between refreshes (``track``, on by
default) the basis's top block moves one warm-started power step per step, orth(mean_i Y_i C̄ᵀ) with C̄ the
mean coefficients of the last step that sent that block (PowerSGD's P step: k·r numbers), completed by the
rest of the old basis; the greedy choice still ranges over all k directions, so the contraction holds. A
basis is refreshed every τ = ``refresh_every`` steps (200, the paper's) and, with ``keep_energy`` > 0 (off by
default), also when its r chosen directions keep less than ``keep_energy`` times the share of energy they
kept after its last refresh (at the same step; "mean": the next step).

Energies (``estimator``): ``"energy"`` (default) all-reduces the local ‖C_i[j]‖² (k numbers); ``"probe"``
is the paper's estimate of the averaged gradient's energy, (mean_i C_i[j]·z_j)² with one shared Gaussian
probe z_j per direction (expectation ‖mean_i C_i[j]‖²). One-dimensional tensors (biases, norms) and
matrices too small to gain (r·L·MIN_SAVING ≥ n·m) are all-reduced uncompressed in the same message. Bytes:
the payload each worker hands to all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lrdeploy.trainer.traffic import TrafficMeter, for_ddp

__all__ = [
    "ESTIMATOR",
    "GREEDY",
    "KEEP_ENERGY",
    "MIN_SAVING",
    "REFRESH",
    "REFRESH_EVERY",
    "TRACK",
    "WARM_START",
    "GreedyLoreState",
    "full_basis",
    "gram_basis",
    "greedylore_hook",
    "lift",
    "oriented",
]

#: τ, steps between periodic basis refreshes: the paper's 200. The power step keeps the top block fresh in
#: between; every 10 steps with early refreshes (the earlier defaults) sent 1.6× the bytes at rank 3 for no
#: accuracy on held-out seeds (docs/gradient-compression.md, "Choosing the constants"). A "gram" refresh costs
#: k(k+1)/2 numbers.
REFRESH_EVERY = 200
#: How a basis is refreshed: "gram" (default, see the module doc) or "mean" (the paper's: sends the matrix).
REFRESH = "gram"
#: How each direction's energy is measured at the steps between refreshes: "energy" or "probe" (the paper's).
ESTIMATOR = "energy"
#: Refresh a basis early when its r directions keep less than this times the share they kept after its last
#: refresh (the gradient's subspace turned away from it). 0, off: the power step follows a turn by itself, and
#: the early refreshes (0.5, the earlier default) were most of the refresh traffic, without accuracy to show.
KEEP_ENERGY = 0.0
#: Between refreshes, move each basis's top r directions one warm-started power step towards the mean
#: gradient's subspace at every step (k·r numbers per matrix, see `_track`); False keeps bases fixed.
TRACK = True
#: Choose the r directions sent by energy among all k of the basis at every step (the paper's greedy choice);
#: False always sends the tracked top block (then the compressor is PowerSGD's, with Gram refreshes).
GREEDY = True
#: The power step's warm start when the greedy choice sent only part of the top block: "block" (default)
#: keeps the mean coefficients of the last step that sent the whole block; "rows" updates the rows of the
#: block directions just sent and keeps the others' (docs/gradient-compression.md, "Rank 2").
WARM_START = "block"
#: Compress a matrix only when it shrinks at least this much: r·max(n, m)·2 < n·m (torch's PowerSGD default).
MIN_SAVING = 2.0


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """The k × L view with k ≤ L: the matrix itself or its transpose (no copy)."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def full_basis(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A k × k orthonormal basis of the k-side of ``y`` (k × L) by decreasing singular value, and the σ²."""
    u, s, _ = torch.linalg.svd(y.float(), full_matrices=False)
    return u.to(y.dtype), s.square().to(y.dtype)


def gram_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of the symmetric ``gram`` (k × k) by decreasing eigenvalue, and the eigenvalues (≥ 0)."""
    values, vectors = torch.linalg.eigh(gram.double())  # float64: a Gram matrix squares the condition number
    return vectors.flip(1).to(gram.dtype), values.flip(0).clamp_min(0).to(gram.dtype)


def lift(basis: torch.Tensor, chosen: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """B_S C: the k × L matrix that ``coefficients`` (r × L) of basis columns ``chosen`` stand for."""
    return basis[:, chosen] @ coefficients


def _compressible(grad: torch.Tensor, rank: int, min_saving: float) -> bool:
    if grad.dim() < 2:
        return False
    n, m = grad.shape[0], grad.numel() // grad.shape[0]
    return min(rank, n, m) * max(n, m) * min_saving < n * m


def _top(energy: torch.Tensor, rank: int, greedy: bool = True) -> tuple[torch.Tensor, float]:
    """The ``rank`` directions of most energy (most first), or with ``greedy`` off the top block (the first
    ``rank``), and the share of the energy they keep."""
    count = min(rank, energy.numel())
    chosen = torch.topk(energy, count)[1] if greedy else torch.arange(count, device=energy.device)
    share = (energy[chosen].sum() / energy.sum()).item()
    return chosen, share if share == share else 1.0  # NaN: no energy at all


class GreedyLoreState:
    """What GreedyLore keeps between steps: per parameter its basis and residual, the shared probe stream."""

    def __init__(
        self,
        rank: int,
        process_group: dist.ProcessGroup | None = None,
        *,
        refresh_every: int = REFRESH_EVERY,
        min_saving: float = MIN_SAVING,
        seed: int = 0,
        estimator: str = ESTIMATOR,
        keep_energy: float = KEEP_ENERGY,
        refresh: str = REFRESH,
        track: bool = TRACK,
        greedy: bool = GREEDY,
        warm_start: str = WARM_START,
    ) -> None:
        if estimator not in ("energy", "probe") or refresh not in ("gram", "mean"):
            raise ValueError(f"unknown GreedyLore estimator {estimator!r} or refresh {refresh!r}")
        if warm_start not in ("block", "rows"):
            raise ValueError(f"unknown GreedyLore warm start {warm_start!r}")
        self.rank, self.group = rank, process_group
        self.refresh_every, self.min_saving = refresh_every, min_saving
        self.estimator, self.keep_energy, self.refresh, self.track = estimator, keep_energy, refresh, track
        self.greedy, self.warm_start = greedy, warm_start
        self.applied: dict[int, torch.Tensor] = {}  # mean coefficients (r × L) of the top block, last sent
        self.iter = 0
        self.bases: dict[int, torch.Tensor] = {}  # keyed by id(parameter): DDP may regroup its buckets
        self.errors: dict[int, torch.Tensor] = {}
        self.chosen: dict[int, torch.Tensor] = {}  # the directions sent at the last step (for inspection)
        self.kept: dict[int, float] = {}  # share of energy the r directions kept after the last refresh
        self.stale: set[int] = set()  # "mean" only: refreshed at the next step (a refresh sends the matrix)
        self.generator = torch.Generator().manual_seed(seed)  # same seed on every worker: same probes
        self.meter = TrafficMeter()

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place to its mean over the workers, counting its bytes."""
        self.meter.add(tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor.div_(dist.get_world_size(self.group))

    def refreshed(self, key: int, basis: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """Take ``basis`` (energies ``energy``) for ``key``; the directions it chooses now."""
        chosen, self.kept[key] = _top(energy, self.rank, self.greedy)
        self.bases[key] = basis
        self.stale.discard(key)
        self.meter.notes["basis_refreshes"] = self.meter.notes.get("basis_refreshes", 0) + 1
        return chosen


def greedylore_hook(state: GreedyLoreState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's mean gradient, GreedyLore-compressed (see the module doc).

    Collectives, each one flat message for all of the bucket's matrices: power steps (k·r each), energies
    (k each), Gram triangles of the bases refreshed at this step, then coefficients and dense tensors.
    """
    buffer = bucket.buffer()
    periodic = state.iter % state.refresh_every == 0
    dense, matrices = [], []
    for grad, param in zip(bucket.gradients(), bucket.parameters(), strict=True):  # grads: views of buffer
        if not _compressible(grad, state.rank, state.min_saving):
            dense.append(grad)
            continue
        key = id(param)  # not the bucket's index: DDP may regroup its buckets after the first step
        y = oriented(grad.view(grad.shape[0], -1))
        if key in state.errors:
            y.add_(state.errors[key])
        matrices.append((key, y))
    due = {key for key, _ in matrices if periodic or key not in state.bases or key in state.stale}
    kept = [(key, y) for key, y in matrices if key not in due]
    whole = [(key, y) for key, y in matrices if key in due] if state.refresh == "mean" else []
    if state.track and state.refresh == "gram":
        _track(state, [(key, y) for key, y in kept if key in state.applied])
    # key -> (chosen directions, their local coefficients or None to compute them in a refreshed basis)
    plan: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    refresh = [(key, y) for key, y in matrices if key in due] if state.refresh == "gram" else []
    ys = dict(kept)
    for key, (energy, coefficients) in _energies(state, kept).items():
        chosen, share = _top(energy, state.rank, state.greedy)
        if share >= state.keep_energy * state.kept[key]:
            plan[key] = chosen, coefficients[chosen]
        elif state.refresh == "gram":  # the subspace turned: a new basis at this step, from k(k+1)/2 numbers
            refresh.append((key, ys[key]))
        else:  # the refresh sends the whole matrix: postpone it to the next step
            state.stale.add(key)
            plan[key] = chosen, coefficients[chosen]
    plan.update({key: (chosen, None) for key, chosen in _gram_refresh(state, refresh).items()})
    sent = [(key, y, _compress(state, key, y, *plan[key])) for key, y in matrices if key in plan]
    # One message: uncompressed tensors, matrices refreshed whole ("mean"), coefficients of the rest.
    parts = (
        [t.reshape(-1) for t in dense] + [y.reshape(-1) for _, y in whole] + [c.reshape(-1) for *_, c in sent]
    )
    message = state.mean_(torch.cat(parts)) if parts else buffer.new_empty(0)
    offset = 0
    for tensor in dense + [y for _, y in whole]:
        tensor.copy_(message[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    for key, y in whole:  # the paper's lazy half: a new basis from the mean matrix, nothing left over
        state.errors[key] = torch.zeros_like(y)
        state.refreshed(key, *full_basis(y))
    for key, y, c in sent:
        mean, chosen = message[offset : offset + c.numel()].view_as(c), state.chosen[key]
        y.copy_(lift(state.bases[key], chosen, mean))
        _remember(state, key, chosen, mean)
        offset += c.numel()
    state.meter.step_done(bucket)
    if bucket.is_last():
        state.iter += 1
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


def _remember(state: GreedyLoreState, key: int, chosen: torch.Tensor, mean: torch.Tensor) -> None:
    """Keep the mean coefficients just sent as the next power step's warm start (see WARM_START), and count
    how often the greedy choice leaves the tracked top block (one host read per matrix)."""
    block = chosen < len(chosen)
    off_block = len(chosen) - int(block.sum())
    notes = state.meter.notes
    notes["matrices_sent"] = notes.get("matrices_sent", 0) + 1
    notes["off_block_directions"] = notes.get("off_block_directions", 0) + off_block
    if off_block == 0:  # the whole top block (distinct indices all < r)
        state.applied[key] = mean if state.warm_start == "block" else mean[chosen.argsort()]
    elif state.warm_start == "rows" and key in state.applied and off_block < len(chosen):
        state.applied[key][chosen[block]] = mean[block]  # row j: block direction j


def _energies(
    state: GreedyLoreState, matrices: list[tuple[int, torch.Tensor]]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each direction's energy in each matrix's current basis, all-reduced (one message of k per matrix),
    and the local coefficients Bᵀ Y_i they come from (k × L)."""
    if not matrices:
        return {}
    coefficients = [state.bases[key].T @ y for key, y in matrices]  # k × L each, local
    if state.estimator == "probe":
        probes = [torch.randn(c.shape, generator=state.generator).to(c.device, c.dtype) for c in coefficients]
        scores = [(c * z).sum(dim=1) for c, z in zip(coefficients, probes, strict=True)]
    else:
        scores = [c.square().sum(dim=1) for c in coefficients]
    flat = state.mean_(torch.cat(scores)).split([s.numel() for s in scores])
    square = state.estimator == "probe"  # the probe's mean is squared after averaging (the paper's Alg. 2)
    return {
        key: (s.square() if square else s, c)
        for (key, _), s, c in zip(matrices, flat, coefficients, strict=True)
    }


def _track(state: GreedyLoreState, matrices: list[tuple[int, torch.Tensor]]) -> None:
    """One warm-started power step per basis: its top block becomes orth(mean_i Y_i C̄ᵀ), C̄ the coefficients
    applied at the last step (so the block follows the mean gradient's subspace, as PowerSGD's P does); the
    rest of the old basis, orthogonalised against it, completes it. One message of k·r numbers per matrix."""
    if not matrices:
        return
    local = [y @ state.applied[key].T for key, y in matrices]  # k × r each
    flat = state.mean_(torch.cat([p.reshape(-1) for p in local])).split([p.numel() for p in local])
    for (key, _), p, values in zip(matrices, local, flat, strict=True):
        block = torch.cat([values.view_as(p), state.bases[key]], dim=1)  # k × (r + k): the new block first
        state.bases[key] = torch.linalg.qr(block.double())[0].to(p.dtype)  # k × k, orthonormal


_UPPER: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # triu_indices by size and device


def _upper(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if (k, str(device)) not in _UPPER:
        _UPPER[k, str(device)] = tuple(torch.triu_indices(k, k, device=device))
    return _UPPER[k, str(device)]


def _gram_refresh(
    state: GreedyLoreState, matrices: list[tuple[int, torch.Tensor]]
) -> dict[int, torch.Tensor]:
    """New bases from mean_i Y_i Y_iᵀ (upper triangles in one message), their eigenvalues the energies; the
    directions each now chooses."""
    if not matrices:
        return {}
    upper = [_upper(y.shape[0], y.device) for _, y in matrices]
    local = [(y @ y.T)[i, j] for (_, y), (i, j) in zip(matrices, upper, strict=True)]
    flat = state.mean_(torch.cat(local)).split([t.numel() for t in local])
    chosen = {}
    for (key, y), (i, j), values in zip(matrices, upper, flat, strict=True):
        gram = y.new_empty(y.shape[0], y.shape[0])
        gram[i, j], gram[j, i] = values, values
        chosen[key] = state.refreshed(key, *gram_basis(gram))
    return chosen


def _compress(
    state: GreedyLoreState, key: int, y: torch.Tensor, chosen: torch.Tensor, coefficients: torch.Tensor | None
) -> torch.Tensor:
    """The coefficients of ``y``'s ``chosen`` directions (computed here when not given); keeps exactly what
    is not sent as the residual."""
    picked = state.bases[key][:, chosen]
    coefficients = picked.T @ y if coefficients is None else coefficients
    state.chosen[key] = chosen
    state.errors[key] = y - picked @ coefficients
    return coefficients


for_ddp(greedylore_hook)
