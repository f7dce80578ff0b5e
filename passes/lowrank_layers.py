"""The adapters of issue 16 (embeddings, recurrent input weights, ConvTranspose), keyed by op for ADAPTERS."""

from __future__ import annotations

from lrdeploy.passes.lowrank_convtranspose import ConvTransposeOp
from lrdeploy.passes.lowrank_embedding import EmbeddingOp
from lrdeploy.passes.lowrank_recurrent import RECURRENT_OPS, RecurrentOp

__all__ = ["LAYER_ADAPTERS"]

LAYER_ADAPTERS = {
    adapter.op: adapter
    for adapter in (EmbeddingOp(), ConvTransposeOp(), *(RecurrentOp(op) for op in RECURRENT_OPS))
}
