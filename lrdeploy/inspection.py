"""``inspect``: the factorizable layers and the singular-value profile of their BN-folded weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from lrdeploy import costs
from lrdeploy.modelio import load_model
from lrdeploy.passes.inline import inline_layer_functions
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.upgrade import upgrade_opset
from lrdeploy.pipeline import decision_dicts, prepare_graph
from lrdeploy.plan import LayerDecision, find_groups
from lrdeploy.policy import round_half_up
from lrdeploy.report import strict_json
from lrdeploy.spectrum import Spectrum

__all__ = ["Inspection", "LayerSpectrum", "inspect"]


@dataclass(frozen=True)
class LayerSpectrum:
    """One factorizable weight (with every node that reads it) and its singular values."""

    names: tuple[str, ...]
    op: str
    weight_shape: tuple[int, ...]
    spectrum: Spectrum

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
            "singular_values": [float(s) for s in self.spectrum.singular_values],
        }


@dataclass(frozen=True)
class Inspection:
    layers: list[LayerSpectrum]
    skipped: list[LayerDecision]
    batchnorm: list[dict]
    params: int

    def to_json(self) -> str:
        return strict_json(
            {
                "params": self.params,
                "layers": [layer.to_dict() for layer in self.layers],
                "not_factorizable": [{"name": d.name, "op": d.op, "reason": d.reason} for d in self.skipped],
                "batchnorm": self.batchnorm,
            }
        )


def inspect(model: str | os.PathLike | onnx.ModelProto, *, fold_bn: bool = True) -> Inspection:
    """Profile every factorizable weight after BN folding; nothing is written."""
    original, _ = inline_layer_functions(upgrade_opset(load_model(model)[0])[0])
    name_nodes(original.graph)  # the same names compress gives, for --include/--exclude/--overrides
    graph, _, _, folded = prepare_graph(original, fold_bn)
    groups, unfit = find_groups(graph)
    layers = []
    for group in groups:
        spectrum = Spectrum.of(group.view.matrix())
        spectrum.release()
        names = tuple(node.name for node in group.nodes)
        shape = tuple(int(d) for d in group.view.weight.shape)
        layers.append(LayerSpectrum(names, group.view.layout[0], shape, spectrum))
    shared = [LayerDecision(n.name, n.op, "skipped", g.problem) for g in groups if g.problem for n in g.nodes]
    return Inspection(layers, unfit + shared, decision_dicts(folded), costs.count_params(original))
