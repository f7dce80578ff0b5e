"""What produced a compressed model, written into its ``metadata_props``.

- ``lrdeploy.version``: the lrdeploy version;
- ``lrdeploy.config``: the compression config as compact JSON (policy, rank multiple, include/exclude,
  overrides, BN folding);
- ``lrdeploy.source_sha256``: SHA-256 of the source model file (streamed), or of the serialized
  ModelProto given to the API.

The user's own metadata is kept as it is. Keys of an earlier lrdeploy run are replaced, so a model
compressed twice carries one set, describing the last run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx

from lrdeploy.config import CompressConfig

__all__ = ["provenance", "source_sha256"]

_CHUNK = 1 << 20


def source_sha256(source: str | os.PathLike | onnx.ModelProto) -> str | None:
    """The source's SHA-256, or None when it cannot be taken (a proto over protobuf's 2 GB limit)."""
    digest = hashlib.sha256()
    if isinstance(source, onnx.ModelProto):
        try:
            digest.update(source.SerializeToString(deterministic=True))
        except ValueError:
            return None
        return digest.hexdigest()
    with Path(source).open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(source: str | os.PathLike | onnx.ModelProto, config: CompressConfig) -> dict[str, str]:
    from lrdeploy import __version__

    entries = {
        "lrdeploy.version": __version__,
        "lrdeploy.config": json.dumps(config.to_dict(), separators=(",", ":"), sort_keys=True),
    }
    digest = source_sha256(source)
    if digest is not None:
        entries["lrdeploy.source_sha256"] = digest
    return entries
