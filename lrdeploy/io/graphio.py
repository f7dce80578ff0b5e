"""Between ONNX protos and onnx-graphsurgeon graphs, keeping what graphsurgeon does not carry.

graphsurgeon rebuilds the model on export: it drops model metadata (``metadata_props``, where runtimes
keep label maps and vocabularies), node doc strings and the exact input/output declarations. We put them
back from the original. Weights that are still in their source file stay there (``FileValues``): the
exported tensor keeps pointing at the file until `lrdeploy.io.modelio.save_model` copies the bytes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from lrdeploy.io.lazyweights import is_file_backed, read_tensor
from lrdeploy.passes.scopes import all_graphs
from lrdeploy.passes.values import materialize_deferred

__all__ = ["from_graph", "set_metadata", "to_graph"]


class FileValues(LazyValues):
    """LazyValues that read a file-backed tensor's byte range instead of expecting raw_data."""

    def load(self) -> np.ndarray:
        return read_tensor(self.tensor)


@contextmanager
def _quiet_graphsurgeon() -> Iterator[None]:
    """graphsurgeon prints warnings ("Could not convert: BFLOAT16", "colored module is not installed") on
    stdout/stderr; lrdeploy reports what matters itself, so only its errors are let through."""
    saved = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = saved


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    with _quiet_graphsurgeon():
        graph = gs.import_onnx(model)
    for tensor in (t for body in all_graphs(graph) for t in body.tensors().values()):
        values = getattr(tensor, "_values", None)
        if isinstance(values, LazyValues) and is_file_backed(values.tensor):
            tensor._values = FileValues(values.tensor)
            # Unread, it exports as its own proto (location included); once a pass reads its values it
            # exports from the array, and graphsurgeon would copy this EXTERNAL flag onto inline bytes.
            tensor.data_location = None
    return graph


def _restore_io(exported: onnx.GraphProto, original: onnx.GraphProto) -> None:
    weights = {t.name for t in original.initializer}
    kept_inputs = [v for v in original.input if v.name not in weights]
    if [v.name for v in kept_inputs] == [v.name for v in exported.input]:
        del exported.input[:]
        exported.input.extend(kept_inputs)
    if [v.name for v in original.output] == [v.name for v in exported.output]:
        del exported.output[:]
        exported.output.extend(original.output)


def _subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            yield from (attr.g,) if attr.type == onnx.AttributeProto.GRAPH else attr.graphs


def _body_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for sub in _subgraphs(graph):
        yield from sub.initializer
        yield from _body_initializers(sub)


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every value name the graph and its bodies define (sibling bodies may reuse one)."""
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.update(node.output)
    for sub in _subgraphs(graph):
        names |= _names(sub)
    return names


def _unshare_outer_weights(exported: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """Store once, in the main graph, the weights that If/Loop/Scan bodies read from outside themselves.

    graphsurgeon writes every constant a body reads into that body's initializers, so a weight read by the
    main graph and two branches would be stored three times. A body may not redefine an outer name, so its
    copy of a main-graph weight is the same tensor: keep one, in the main graph. The same holds for a new
    tensor (factors of a weight two branches share) found in several bodies: names lrdeploy makes are unique
    in the model, so its copies are one tensor. A name the original defines stays where it is (sibling
    bodies may each define their own tensor of one name).
    """
    outer = {t.name for t in original.initializer}
    outer.update(out for node in original.node if node.op_type == "Constant" for out in node.output)
    copies = Counter(t.name for t in _body_initializers(exported))
    hoist = outer | {name for name, count in copies.items() if count > 1 and name not in _names(original)}
    stored = {t.name for t in exported.initializer}

    def visit(graph: onnx.GraphProto) -> None:
        for sub in _subgraphs(graph):
            kept = []
            for tensor in sub.initializer:
                if tensor.name not in hoist:
                    kept.append(tensor)
                elif tensor.name not in stored:
                    exported.initializer.append(tensor)
                    stored.add(tensor.name)
            if len(kept) != len(sub.initializer):
                del sub.initializer[:]
                sub.initializer.extend(kept)
            visit(sub)

    visit(exported)


def _drop_outer_value_info(graph: onnx.GraphProto) -> None:
    """graphsurgeon declares, inside each body, the outer tensors the body reads, with the shapes they had
    on import (``batch`` where the caller fixed it); shape inference then takes those over the outer ones.
    A body declares only what it defines."""
    for sub in _subgraphs(graph):
        defined = {out for node in sub.node for out in node.output}
        defined.update(v.name for v in sub.input)
        kept = [v for v in sub.value_info if v.name in defined]
        if len(kept) != len(sub.value_info):
            del sub.value_info[:]
            sub.value_info.extend(kept)
        _drop_outer_value_info(sub)


def set_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Set ``entries`` in ``metadata_props``: a key already there is replaced in place (once), others kept."""
    kept, done = [], set()
    for prop in model.metadata_props:
        if prop.key not in entries:
            kept.append(onnx.StringStringEntryProto(key=prop.key, value=prop.value))
        elif prop.key not in done:
            kept.append(onnx.StringStringEntryProto(key=prop.key, value=entries[prop.key]))
            done.add(prop.key)
    kept += [onnx.StringStringEntryProto(key=k, value=v) for k, v in entries.items() if k not in done]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


#: In-memory weights this large are exported as placeholders and filled in afterwards (`_defer_payloads`).
_DEFER_BYTES = 1 << 20
_PENDING = "lrdeploy-pending-payload"


def _defer_payloads(graph: gs.Graph) -> dict[str, tuple[gs.Constant, np.ndarray]]:
    """Swap large in-memory constants (new factors) for empty external-data placeholders.

    graphsurgeon's export serializes every array into a TensorProto, which onnx's make_graph and
    make_model then copy twice more: with the graph's own arrays that is four copies of the new weights
    at once (3.8 GB for a 0.73 GB output). A placeholder is exported as it is (like a weight still in its
    file), and `_fill_payloads` then writes each array into the model one tensor at a time.
    """
    deferred: dict[str, tuple[gs.Constant, np.ndarray]] = {}
    for g in (graph, *graph.subgraphs(recursive=True)):
        for tensor in g.tensors().values():
            values = getattr(tensor, "_values", None)
            if not isinstance(tensor, gs.Constant) or not isinstance(values, np.ndarray):
                continue
            if values.nbytes < _DEFER_BYTES or values.dtype.kind in "OUSV" or tensor.name in deferred:
                continue
            try:
                data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            except (KeyError, TypeError, ValueError):
                continue
            placeholder = onnx.TensorProto(name=tensor.name, data_type=data_type, dims=values.shape)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            placeholder.external_data.add(key="location", value=_PENDING)
            deferred[tensor.name] = (tensor, values)
            tensor._values = LazyValues(placeholder)
    return deferred


def _fill_payloads(graph: onnx.GraphProto, deferred: dict[str, tuple[gs.Constant, np.ndarray]]) -> None:
    if not deferred:
        return
    for tensor in _all_initializers(graph):
        pending = tensor.data_location == onnx.TensorProto.EXTERNAL and any(
            entry.key == "location" and entry.value == _PENDING for entry in tensor.external_data
        )
        if pending:
            values = deferred[tensor.name][1]
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = np.ascontiguousarray(values).tobytes()


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*attr.graphs, *([attr.g] if attr.HasField("g") else [])):
                yield from _all_initializers(sub)


def _take_empty_lists(graph: gs.Graph) -> list[tuple[gs.Node, str, object]]:
    """Attributes holding an empty list: graphsurgeon cannot tell their type, so cannot export them."""
    taken = []
    for g in (graph, *graph.subgraphs(recursive=True)):
        for node in g.nodes:
            for key, value in list(node.attrs.items()):
                if isinstance(value, list | tuple) and not value:
                    taken.append((node, key, node.attrs.pop(key)))
    return taken


def _put_empty_lists(graph: onnx.GraphProto, wanted: set[tuple[str, str]], original: onnx.GraphProto) -> None:
    """Write the empty list attributes back, typed as the original node's (INTS when it is not there)."""
    if not wanted:
        return
    types = {(n.name, a.name): a.type for n in _all_nodes(original) for a in n.attribute}
    for node in _all_nodes(graph):
        for name, key in wanted:
            if node.name == name and all(a.name != key for a in node.attribute):
                kind = types.get((name, key), onnx.AttributeProto.INTS)
                node.attribute.append(onnx.AttributeProto(name=key, type=kind))


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in (*attr.graphs, *([attr.g] if attr.HasField("g") else [])):
                yield from _all_nodes(sub)


def from_graph(
    graph: gs.Graph, original: onnx.ModelProto, ir_version: int, metadata: Mapping[str, str] | None = None
) -> onnx.ModelProto:
    """Export ``graph`` as a model that carries the original's metadata, opsets and declarations.

    ``metadata`` (lrdeploy's provenance) is set on top of the original's ``metadata_props``.
    """
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for body in all_graphs(graph):  # If/Loop/Scan bodies hold folded weights too
        materialize_deferred(body)
    empty = _take_empty_lists(graph)
    deferred = _defer_payloads(graph)
    try:
        with warnings.catch_warnings(), _quiet_graphsurgeon():
            warnings.simplefilter("ignore")
            model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for node, key, value in empty:
            node.attrs[key] = value
        for tensor, values in deferred.values():
            tensor._values = values
    _fill_payloads(model.graph, deferred)
    _put_empty_lists(model.graph, {(n.name, k) for n, k, _ in empty}, original.graph)
    model.ir_version = ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(original, name))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    set_metadata(model, metadata or {})
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    _restore_io(model.graph, original.graph)
    _unshare_outer_weights(model.graph, original.graph)
    _drop_outer_value_info(model.graph)
    node_info = {n.name: n for n in original.graph.node if n.name and (n.doc_string or n.metadata_props)}
    for node in model.graph.node:
        source = node_info.get(node.name)
        if source is not None:
            node.doc_string = source.doc_string
            node.metadata_props.extend(source.metadata_props)
    return model
