"""In-memory-computing deployment: crossbar mapping (arrays, utilization, cycles), IMC cost models for
the allocator, and accuracy under analog non-idealities.

report = lrdeploy.imc.map_model("model.onnx", array=(256, 256))
"""

from __future__ import annotations

from lrdeploy.imc.mapping import MAPPINGS, ArraySize, parse_array
from lrdeploy.imc.report import ImcLayer, ImcReport, map_model

__all__ = ["MAPPINGS", "ArraySize", "ImcLayer", "ImcReport", "map_model", "parse_array"]
