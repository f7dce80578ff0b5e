"""``compress``: the product's main job as a Python function. It prints nothing; the CLI renders the report.

    model, report = lrdeploy.compress("model.onnx", rank_ratio=0.25, output="model.lowrank.onnx")

Steps: load (lazily) → count → normalize + fold BN → calibrate (with ``calib``) → plan (SVD or whitened
factors per weight; ranks from the policy or a budget, `lrdeploy.planning.budget`) → rewrite → export →
count → save (into a staging folder beside the output while it is verified) → check (onnx's full check,
`lrdeploy.io.modelcheck`) → verify → report, then the output, its external data and the JSON report are
renamed into place together (`lrdeploy.io.outputs`).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import onnx

from lrdeploy.config import CompressConfig
from lrdeploy.errors import UsageError, VerificationFailed
from lrdeploy.io.graphio import from_graph
from lrdeploy.io.modelcheck import check_output
from lrdeploy.io.modelio import (
    EXTERNAL_DATA_THRESHOLD,
    choose_ir_version,
    estimated_size,
    files_read,
    load_model,
    materialize,
    model_opset,
    save_model,
)
from lrdeploy.io.outputs import OutputSet
from lrdeploy.io.provenance import provenance
from lrdeploy.passes.factorize import factorize
from lrdeploy.passes.inline import inline_layer_functions
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.scopes import scoped_nodes, scoped_total
from lrdeploy.passes.upgrade import upgrade_opset
from lrdeploy.pipeline import calibration_layers, decision_dicts, prepare_graph
from lrdeploy.planning import costs
from lrdeploy.planning.budget import plan_budget
from lrdeploy.planning.calibration import Calibration, calibrate
from lrdeploy.planning.plan import LayerDecision, find_groups, plan_layers, use_groups
from lrdeploy.report import LayerReport, Report, branch_notes
from lrdeploy.runtime.inputs import resolve_shapes
from lrdeploy.spelling import either, option

__all__ = ["compress"]

Progress = Callable[[str, int, int], None]


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start


def _layer_reports(
    decisions: list[LayerDecision],
    pairs: Mapping[str, list[str]],
    macs_before: Mapping[str, int | None],
    macs_after: Mapping[str, int | None],
) -> list[LayerReport]:
    reports = []
    for decision in decisions:
        before = macs_before.get(decision.name)
        after = macs_after.get(decision.name, before)
        if decision.name in pairs:
            pair = [macs_after.get(name) for name in pairs[decision.name]]
            after = None if None in pair else sum(pair)
        reports.append(LayerReport(decision, before, after))
    return reports


def _total(model: onnx.ModelProto, macs: Mapping[str, int | None]) -> int | None:
    """The model's MACs: the main graph, the costlier branch of each If, one pass of each loop body."""
    return scoped_total(model.graph, macs)[0]


def compress(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    rank: int | None = None,
    output: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    config: CompressConfig | None = None,
    progress: Progress | None = None,
    **options: object,
) -> tuple[onnx.ModelProto, Report]:
    """Fold BN, factorize Conv/Gemm/MatMul weights by truncated SVD, verify, and report.

    Give the policy as ``rank_ratio``/``energy``/``rank``, or a whole-model budget as ``target_params``
    or ``target_macs`` (a fraction of the original; ``allocate="error"|"sensitivity"``), plus
    `CompressConfig` fields as keywords (``rank_multiple``, ``include``, ``exclude``, ``overrides``,
    ``fold_bn``, ``verify``, ``input_shapes``, ``keep_failed``, ``requantize``; calibration: ``calib`` — what
    ``data`` takes: a path, "mnist" (training digits) or arrays —, ``calib_samples``, ``calib_holdout``,
    ``method="auto"|"svd"|"whiten"``; group low rank: ``groups=G``; IMC crossbars: ``imc_array="RxC"``
    (adds the mapping table; required by ``cost="imc-arrays"|"imc-cycles"``), ``imc_mapping``) and
    `VerifyConfig` fields (``device``, ``data``, ``gates``,
    ``seed``, ...), or a ready ``config``. The input is never modified. With ``output`` the model is
    written there atomically (external data above 2 GB), and only if it passes the verification gates
    (or ``keep_failed``); a failed gate raises `VerificationFailed` with ``.report`` attached. With
    ``report`` the JSON report is written there too, also when a gate fails. Nothing is written when
    anything else fails, and no output may replace a file the model reads (`lrdeploy.io.outputs`).
    """
    if config is None:
        config = CompressConfig.build(rank_ratio=rank_ratio, energy=energy, rank=rank, **options)
    elif rank_ratio is not None or energy is not None or rank is not None or options:
        raise UsageError("pass either config= or the policy and options as keywords, not both")
    with OutputSet() as outputs:
        return _compress(model, config, Path(output) if output else None, report, outputs, progress)


def _compress(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompressConfig,
    output_path: Path | None,
    report_path: str | os.PathLike | None,
    outputs: OutputSet,
    progress: Progress | None,
) -> tuple[onnx.ModelProto, Report]:
    timer = _Timer()
    with timer("load"):
        original, source = load_model(model)
        outputs.protect(files_read(original, source))
        data_path = output_path.with_name(output_path.name + ".data") if output_path else None
        out_flag = either("-o", "output=")
        outputs.check(output_path, out_flag)
        outputs.check(data_path, f"{out_flag} (its .data file)")
        outputs.check(Path(report_path) if report_path else None, option("report"))
        random_data = config.verification.data in (None, "random")
        shapes = resolve_shapes(original, config.input_shapes, strict=config.verify and random_data)
        input_opset = model_opset(original) or 0
        original, upgraded = upgrade_opset(original)
        original, inlined = inline_layer_functions(original)
        renamed = name_nodes(original.graph)  # our private copy; counting and the report go by name
    with timer("count"):
        params_before = costs.count_params(original)
        macs_before = costs.count_macs(original, shapes)
        total_before = _total(original, macs_before)
    with timer("fold_bn"):
        graph, names, normalized, folded = prepare_graph(original, config.fold_bn, config.requantize)
    with timer("plan"):
        groups, unfit = find_groups(graph, original)
        if config.groups > 1:
            use_groups(groups, config.groups)
    calibration = folded_model = None
    if config.calib is not None:
        with timer("calibrate"):
            folded_model, calibration = _calibrate(graph, original, groups, config)
    if config.cost == "latency" and folded_model is None:  # the latency table times the folded layers
        folded_model = _folded(graph, original)
    with timer("plan"):
        budget = costing = None
        if config.budget is None:
            tick = (lambda done, total: progress("factorize", done, total)) if progress else None
            moments = calibration.moments if calibration else None
            rewrites, decisions = plan_layers(groups, config, tick, moments)
        else:
            removed = folded.counts.get("params_removed", 0) if folded is not None else 0
            totals = {"params": params_before, "macs": total_before, "params_removed": removed}
            rewrites, decisions, budget, costing = plan_budget(
                groups, config, totals, macs_before, calibration, folded_model, progress, original, shapes
            )
        del folded_model
    with timer("rewrite"):
        rewritten = factorize(graph, rewrites, names)
        pairs = {d.node: d.details["pair"] for d in rewritten.decisions}
        kept_rewrites = rewrites if costing is not None and config.cost == "latency" else []
        del rewrites, groups
        gc.collect()  # replaced weights sit in graphsurgeon's reference cycles until collected
        ir_version = choose_ir_version(original.ir_version, original)
        metadata = provenance(model, config)  # hashes the input file: once
        compressed = from_graph(graph, original, ir_version, metadata=metadata)
        del graph
        gc.collect()  # the graph's copy of the factors: the model holds them now
    latency = None
    if kept_rewrites:
        with timer("latency"):
            assert costing is not None
            from lrdeploy.runtime.latencyguard import guard

            compressed, decisions, pairs, latency = guard(
                (original, source),
                compressed,
                kept_rewrites,
                decisions,
                pairs,
                costing,
                config,
                ir_version,
                metadata,
            )
        del kept_rewrites
    with timer("count"):
        params_after = costs.count_params(compressed)
        macs_after = costs.count_macs(compressed, shapes)
        total_after = _total(compressed, macs_after)
    deployed = None
    if config.precision != "fp32" or config.quantize:
        with timer("precision"):
            compressed, deployed = _deploy(original, compressed, config)
    order = {node.name: i for i, node in enumerate(scoped_nodes(original.graph))}
    decisions = sorted(unfit + decisions, key=lambda d: order.get(d.name, len(order)))
    report = Report(
        input=str(source) if source else None,
        output=str(output_path) if output_path else None,
        config=config.describe(),
        opset=input_opset,
        ir_version=(original.ir_version, compressed.ir_version),
        input_shapes={k: list(v) if v is not None else None for k, v in shapes.items()},
        params_before=params_before,
        params_after=params_after,
        macs_before=total_before,
        macs_after=total_after,
        layers=_layer_reports(decisions, pairs, macs_before, macs_after),
        batchnorm=decision_dicts(folded),
        normalized=[d for r in (upgraded, inlined, renamed, normalized) for d in decision_dicts(r)],
        notes=[d.reason for d in upgraded.decisions],
        calibration=calibration.to_dict() if calibration else None,
    )
    report.notes += branch_notes(original, macs_before)
    few = [d.name for d in decisions if d.calib_rows and d.n and d.calib_rows[0] < d.n]
    if few:
        report.notes.append(
            f"{len(few)} layer(s) had fewer calibration rows than inputs (e.g. '{few[0]}'); their statistics "
            "are rank-deficient and floored (see calib_rows); more calibration samples help"
        )
    if config.imc_array is not None:
        from lrdeploy.imc.report import compressed_table

        imc = compressed_table(original, compressed, config.imc_array, shapes, decisions)
        if isinstance(imc, str):
            report.notes.append(f"{option('imc_array')}: {imc}")
        else:
            report.imc = imc
    if budget is not None:
        counted = {
            "params": (params_before, params_after),
            "macs": (total_before, total_after),
        }
        before, after = counted.get(budget.kind, (None, None))
        achieved = after / before if after is not None and before else None  # other costs: predicted only
        report.budget = budget.to_dict() | {"achieved": achieved}
        if costing is not None and costing.notes:
            report.notes.extend(costing.notes)
    report.latency = latency
    report.precision = deployed
    staged = outputs.stage(output_path) if output_path is not None else None
    with timer("save"):
        if staged is not None:
            if save_model(compressed, staged, data_name=data_path.name) is not None:
                outputs.stage(data_path, companion=True)
        elif estimated_size(compressed) < EXTERNAL_DATA_THRESHOLD:
            materialize(compressed)
        else:
            raise UsageError("the compressed model is over 2 GB; pass output= to write it with external data")
    if staged is not None:
        with timer("check"):  # also with verification off: never an invalid model written silently
            warning = check_output(staged, source if source is not None else model)
        if warning:
            report.notes.append(warning)
    if config.verify:
        with timer("verify"):
            report.verification = _verify(original, source, compressed, staged, shapes, config, progress)
    failures = config.verification.gates.failures(report.verification) if report.verification else []
    report.gate_failures = failures
    written = not failures or config.keep_failed
    if not written:
        report.output = None
    report.timings = timer.seconds
    if report_path is not None:
        outputs.write_text(Path(report_path), report.to_json())
    outputs.promote(skip=() if written else (output_path, data_path))
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        kept = "kept anyway (--keep-failed)" if config.keep_failed else "not written"
        suffix = f"; output {kept}" if output_path is not None else ""
        raise VerificationFailed(f"verification failed: {failures[0]}{more}{suffix}", report=report)
    return compressed, report


def _folded(graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """The BN-folded model (the layers as they will be factorized), materialized."""
    return materialize(from_graph(graph, original, choose_ir_version(original.ir_version, original)))


def _deploy(original: onnx.ModelProto, compressed: onnx.ModelProto, config: CompressConfig):
    """The factorized model at the deployed precision, and the report's precision entry."""
    from lrdeploy.runtime.precision import convert, weight_bytes

    float_bytes = weight_bytes(compressed)
    deployed = convert(materialize(compressed), config)  # the converters read weights, not our lazy ones
    return deployed, {
        "precision": config.quantize or config.precision,
        "weight_bytes_input": weight_bytes(original),
        "weight_bytes_factorized_fp32": float_bytes,
        "weight_bytes_output": weight_bytes(deployed),
    }


def _calibrate(
    graph, original: onnx.ModelProto, groups, config: CompressConfig
) -> tuple[onnx.ModelProto, Calibration]:
    """Run the BN-folded model (the layers as they will be factorized) over the calibration data."""
    from lrdeploy.runtime.verification import _batch_size  # a fixed batch dim is fed as it is declared

    folded = _folded(graph, original)
    layers = calibration_layers(graph, groups)
    assert config.calib is not None
    calibration = calibrate(
        folded,
        layers,
        config.calib,
        config.verification.image,
        config.calib_samples,
        config.calib_holdout,
        _batch_size(folded, config.verification.batch_size),
        seed=config.verification.seed,
    )
    return folded, calibration


def _verify(original, source, compressed, staged, shapes, config: CompressConfig, progress: Progress | None):
    from lrdeploy.runtime.verification import candidate_source, run_verification, runtime_source

    tick = (lambda done, total: progress("verify", done, total)) if progress else None
    with runtime_source(original, source) as reference, candidate_source(compressed, staged) as candidate:
        return run_verification(original, reference, candidate, shapes, config.verification, tick)
