"""``inspect``: the factorizable layers and the singular-value profile of their BN-folded weights.

Layers inside If/Loop/Scan bodies are listed by their path (``If_0/then_branch/conv``), each with its own
MACs; the model total counts the costlier branch of each If and one pass of each loop body (``notes``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from lrdeploy.io.modelio import load_model
from lrdeploy.passes.inline import inline_layer_functions
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.scopes import scoped_total
from lrdeploy.passes.upgrade import upgrade_opset
from lrdeploy.pipeline import calibration_layers, decision_dicts, prepare_graph
from lrdeploy.planning import costs
from lrdeploy.planning.blocks import spectrum_of
from lrdeploy.planning.plan import LayerDecision, find_groups
from lrdeploy.planning.policy import round_half_up
from lrdeploy.planning.spectrum import Spectrum
from lrdeploy.report import branch_notes, strict_json
from lrdeploy.runtime.datasets import ImageOptions
from lrdeploy.runtime.inputs import resolve_shapes

__all__ = ["CALIB_RATIOS", "Inspection", "LayerSpectrum", "inspect"]

#: Rank ratios at which ``inspect --calib`` gives each layer's output error, plain SVD's and whitened.
CALIB_RATIOS = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class LayerSpectrum:
    """One factorizable weight (with every node that reads it) and its singular values."""

    names: tuple[str, ...]
    op: str
    weight_shape: tuple[int, ...]
    spectrum: Spectrum
    macs: int | None = None  # all readers together, at the inspection's input shapes
    labels: tuple[str, ...] = ()  # what --include/--exclude/--overrides match (`lrdeploy.planning.selection`)
    #: With calibration: relative output error on the fit rows at `CALIB_RATIOS`, {"svd": …, "whiten": …}
    output_errors: dict[str, list[float]] | None = None

    @property
    def m(self) -> int:
        return self.spectrum.m

    @property
    def n(self) -> int:
        return self.spectrum.n

    @property
    def full_rank(self) -> int:
        return self.spectrum.full_rank

    def energy_at(self, ratio: float) -> float:
        return self.spectrum.energy_kept(max(1, round_half_up(ratio * self.full_rank)))

    def rank_for(self, fraction: float) -> int:
        return self.spectrum.rank_for_energy(fraction)

    def break_even_rank(self) -> int:
        """Largest rank that still saves parameters: r·(m + n) < m·n."""
        return (self.m * self.n - 1) // (self.m + self.n)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "op": self.op,
            "weight_shape": list(self.weight_shape),
            "matrix": [self.m, self.n],
            "full_rank": self.full_rank,
            "break_even_rank": self.break_even_rank(),
            "macs": self.macs,
            "labels": list(self.labels),
            "singular_values": [float(s) for s in self.spectrum.singular_values],
            "output_rel_error": (
                {"rank_ratios": list(CALIB_RATIOS), **self.output_errors} if self.output_errors else None
            ),
        }


@dataclass(frozen=True)
class Inspection:
    layers: list[LayerSpectrum]
    skipped: list[LayerDecision]
    batchnorm: list[dict]
    params: int
    macs: dict[str, int | None] = field(default_factory=dict)  # node name (a path inside bodies) → MACs
    input_shapes: dict[str, list[int] | None] = field(default_factory=dict)
    #: What the total assumes when layers sit inside If/Loop/Scan bodies (`lrdeploy.report.branch_notes`).
    notes: list[str] = field(default_factory=list)
    scoped_macs: int | None = None  # the total by `lrdeploy.passes.scopes.scoped_total`, when ``notes``

    @property
    def total_macs(self) -> int | None:
        if self.notes:
            return self.scoped_macs
        values = list(self.macs.values())
        return None if any(v is None for v in values) else sum(values)

    def to_json(self) -> str:
        skipped = [
            {
                "name": d.name,
                "op": d.op,
                "reason": d.reason,
                "macs": self.macs.get(d.name),
                "dynamic": d.dynamic,
            }
            for d in self.skipped
        ]
        return strict_json(
            {
                "params": self.params,
                "macs": self.total_macs,
                "input_shapes": self.input_shapes,
                "layers": [layer.to_dict() for layer in self.layers],
                "not_factorizable": skipped,
                "batchnorm": self.batchnorm,
                "notes": self.notes,
            }
        )


def _sum(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def inspect(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    fold_bn: bool = True,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    calib: object = None,
    calib_samples: int = 256,
    image: ImageOptions | None = None,
    calibration: dict | None = None,
) -> Inspection:
    """Profile every factorizable weight after BN folding, with MACs at ``input_shapes``; nothing is written.

    Symbolic dims not given in ``input_shapes`` are guessed as `compress` does (a leading one is 1);
    MACs that depend on a dim that cannot be guessed are None. With ``calib`` (the sources ``compress``
    takes), each layer's relative output error on the calibration rows is given at `CALIB_RATIOS`
    for plain SVD and whitened factors.
    """
    original, _ = inline_layer_functions(upgrade_opset(load_model(model)[0])[0])
    name_nodes(original.graph)  # the same names compress gives, for --include/--exclude/--overrides
    shapes = resolve_shapes(original, input_shapes, strict=False)
    macs = costs.count_macs(original, shapes)
    graph, _, _, folded = prepare_graph(original, fold_bn)
    groups, unfit = find_groups(graph, original)
    moments = _moments(graph, original, groups, calib, calib_samples, image) if calib is not None else {}
    layers = []
    for group in groups:
        spectrum = spectrum_of(group.view, group.view.matrix())  # grouped convs: per group
        errors = _output_errors(group, spectrum, moments) if moments else None
        spectrum.release()
        names = tuple(node.name for node in group.nodes)
        shape = tuple(int(d) for d in group.view.weight.shape)
        cost = _sum([macs.get(name) for name in names])
        layers.append(LayerSpectrum(names, group.view.layout[0], shape, spectrum, cost, group.labels, errors))
    shared = [LayerDecision(n.name, n.op, "skipped", g.problem) for g in groups if g.problem for n in g.nodes]
    return Inspection(
        layers,
        unfit + shared,
        decision_dicts(folded),
        costs.count_params(original),
        macs,
        {k: list(v) if v is not None else None for k, v in shapes.items()},
        branch_notes(original, macs),
        scoped_total(original.graph, macs)[0],
    )


def _moments(graph, original, groups, calib, samples: int, image: ImageOptions | None) -> dict:
    from lrdeploy.io.graphio import from_graph
    from lrdeploy.io.modelio import choose_ir_version, materialize
    from lrdeploy.planning.calibration import calibrate
    from lrdeploy.runtime.datasets import as_data_source

    folded = materialize(from_graph(graph, original, choose_ir_version(original.ir_version, original)))
    layers = calibration_layers(graph, groups)
    source = as_data_source(calib)
    found = calibrate(folded, layers, source, image or ImageOptions(), samples, 0.0, 32)  # type: ignore[arg-type]
    return found.moments


def _output_errors(group, spectrum: Spectrum, moments: Mapping) -> dict[str, list[float]] | None:
    import numpy as np

    from lrdeploy.planning.whiten import WhitenedSpectrum, component_errors

    found = [moments[n.name].fit for n in group.nodes if n.name in moments]
    if group.problem or not found:
        return None
    fit = sum(m.total for m in found) / sum(m.count for m in found)
    matrix = np.asarray(group.view.matrix(), dtype=np.float64)
    a, b = spectrum.factors(matrix, spectrum.full_rank)
    plain = component_errors(a, b, fit)
    white = WhitenedSpectrum.of(matrix, fit).errors
    ranks = [max(1, round_half_up(r * spectrum.full_rank)) for r in CALIB_RATIOS]
    return {
        "svd": [float(np.sqrt(plain[r])) for r in ranks],
        "whiten": [float(np.sqrt(white[r])) for r in ranks],
    }
