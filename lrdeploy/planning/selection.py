"""Which layers ``--include``/``--exclude``/``--overrides`` select: patterns match any of a layer's labels.

Today's exporters name nodes after op counters (torch's dynamo exporter: ``node_Conv_287``), so node names
alone are a poor handle. A layer's labels are:

- its node name;
- the names of the weights it reads: as they are in the graph now, and as the exporter wrote them
  (``stem.0.weight``, also when the node reads them through a Transpose/Reshape/Cast of constants);
- the module scopes the exporter recorded in the node's ``metadata_props``: torch's
  ``pkg.torch.onnx.name_scopes`` (or onnxscript's ``namespace``), e.g. ``layer1``, ``layer1.0``,
  ``layer1.0.conv1`` for a conv of a ResNet block.

Override keys are globs too: a key applies to every layer it matches and a key that matches none is an
error. A layer matched by several keys takes the key equal to one of its labels (exact beats glob);
if that still leaves keys asking for different ranks, it is an error naming both.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Container, Iterable, Mapping, Sequence

import onnx

from lrdeploy.errors import UsageError
from lrdeploy.passes.normalize import WEIGHT_PATH_OPS
from lrdeploy.planning.policy import FixedRank

__all__ = ["layer_labels", "module_scopes", "select"]

Choice = tuple[FixedRank | None, str | None]  # (override, reason to leave dense)
_MAX_META = 1 << 16
_GLOB = frozenset("*?[")


def module_scopes(node: onnx.NodeProto) -> list[str]:
    """Module paths of a node from exporter metadata, outermost first (the op's own name left out)."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes: list[str] = []
    if len(meta.get("pkg.torch.onnx.name_scopes", "")) > _MAX_META:  # untrusted: no parsing of megabytes
        return []
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            parsed = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            scopes = [str(s) for s in parsed] if isinstance(parsed, list | tuple) else []
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            scopes = []
    elif "namespace" in meta:  # ": pkg.Seq/0: pkg.Conv2d/conv2d: aten.conv2d.default"
        scopes = [segment.partition(":")[0].strip() for segment in meta["namespace"].split("/")]
    return [s for s in scopes[:-1] if s]


def _weight_sources(model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """Tensor name → the initializers/Constant outputs it is computed from, for constant-only tensors."""
    graph = model.graph
    sources: dict[str, tuple[str, ...]] = {t.name: (t.name,) for t in graph.initializer}
    for node in graph.node:  # sorted in a valid model, so producers come first
        if node.op_type == "Constant":
            sources.update((out, (out,)) for out in node.output if out)
        elif node.op_type in (*WEIGHT_PATH_OPS, "Identity") and node.input:
            names = [n for n in node.input if n]
            if all(n in sources for n in names):
                found = tuple(dict.fromkeys(s for n in names for s in sources[n]))
                sources.update((out, found) for out in node.output if out)
    return sources


def layer_labels(model: onnx.ModelProto, names: Container[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Node name → its labels (node name, weight names as exported, module scopes), for ``names`` or all."""
    sources = _weight_sources(model)
    labels = {}
    for node in model.graph.node:
        if names is not None and node.name not in names:
            continue
        weights = (s for name in node.input if name for s in sources.get(name, ()))
        labels[node.name] = tuple(dict.fromkeys((node.name, *weights, *module_scopes(node))))
    return labels


def _matches(labels: Iterable[str], pattern: str) -> bool:
    if _GLOB.isdisjoint(pattern):  # a plain name: a lookup, not a glob per label
        return pattern in labels
    return any(fnmatch.fnmatchcase(label, pattern) for label in labels)


def _override(labels: Sequence[str], overrides: Mapping[str, int], name: str) -> FixedRank | None:
    keys = [key for key in overrides if _matches(labels, key)]
    exact = [key for key in keys if key in labels]
    chosen = exact or keys
    if len({overrides[key] for key in chosen}) > 1:
        a, b = chosen[0], next(k for k in chosen if overrides[k] != overrides[chosen[0]])
        raise UsageError(
            f"--overrides keys '{a}' (rank {overrides[a]}) and '{b}' (rank {overrides[b]}) both select "
            f"layer '{name}'; drop one or use the exact name"
        )
    return FixedRank(overrides[chosen[0]]) if chosen else None


def select(
    layers: Sequence[tuple[Sequence[str], Sequence[str]]],
    overrides: Mapping[str, int],
    include: Sequence[str],
    exclude: Sequence[str],
    policy: object | None,
) -> list[Choice]:
    """One (override, reason to leave dense) per layer, given as (node names, labels).

    Keys and patterns that select nothing are errors: a typo more often than a choice.
    """
    candidates = [name for names, _ in layers for name in names]
    listing = f"{', '.join(candidates[:8]) or '(none)'}{', ...' if len(candidates) > 8 else ''}"
    what = "by node name, weight name or module scope"
    for flag, patterns in (("--overrides", list(overrides)), ("--include", include), ("--exclude", exclude)):
        idle = [p for p in patterns if not any(_matches(labels, p) for _, labels in layers)]
        if idle:
            wrong = (
                f"names '{idle[0]}', which is not a factorizable layer of this model"
                if flag == "--overrides"
                else f"'{idle[0]}' matches no factorizable layer"
            )
            raise UsageError(f"{flag} {wrong} ({what}); the layers are: {listing}")
    choices: list[Choice] = []
    for names, labels in layers:
        override = _override(labels, overrides, names[0])
        if override is not None:
            choices.append((override, None))
        elif policy is None:
            choices.append((None, "no rank policy (only overridden layers are factorized)"))
        elif include and not any(_matches(labels, p) for p in include):
            choices.append((None, "not matched by --include"))
        elif exclude and any(_matches(labels, p) for p in exclude):
            choices.append((None, "matched by --exclude"))
        else:
            choices.append((None, None))
    return choices
