"""lrdeploy: low-rank factorization of ONNX models, verified on ONNX Runtime.

model, report = lrdeploy.compress("model.onnx", rank_ratio=0.25, output="model.lowrank.onnx")
"""

from lrdeploy.api import compress
from lrdeploy.config import CompressConfig
from lrdeploy.errors import LrdeployError, ModelError, UsageError, VerificationFailed
from lrdeploy.inspection import inspect
from lrdeploy.planning.policy import Energy, FixedRank, RankRatio
from lrdeploy.runtime.verification import VerifyConfig, verify
from lrdeploy.runtime.verify import Gates

__version__ = "0.1.0"

__all__ = [
    "CompressConfig",
    "Energy",
    "FixedRank",
    "Gates",
    "LrdeployError",
    "ModelError",
    "RankRatio",
    "UsageError",
    "VerificationFailed",
    "VerifyConfig",
    "__version__",
    "compress",
    "inspect",
    "verify",
]
