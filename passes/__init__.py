"""Graph passes over onnx-graphsurgeon graphs; each returns a PassResult of what it did."""

from lrdeploy.passes.factorize import Rewrite, factorize
from lrdeploy.passes.fold_bn import fold_batchnorm
from lrdeploy.passes.inline import inline_layer_functions
from lrdeploy.passes.lowrank_ops import ADAPTERS, WeightView, weight_view
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.normalize import normalize
from lrdeploy.passes.result import Decision, PassResult

__all__ = [
    "ADAPTERS",
    "Decision",
    "NameRegistry",
    "PassResult",
    "Rewrite",
    "WeightView",
    "factorize",
    "fold_batchnorm",
    "inline_layer_functions",
    "normalize",
    "weight_view",
]
