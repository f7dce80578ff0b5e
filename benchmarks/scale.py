"""Time and peak memory of ``lrdeploy.compress`` on models too large to hold twice: a >2 GB MatMul stack
and LLM-shaped decoders (GPT-2-like: pre-LN blocks, fused QKV, 4× MLP, symbolic batch and sequence).

Every model is generated here with random weights whose spectra decay like trained ones (a rank-k core
plus noise), written straight into its external-data file one tensor at a time. Every compression runs
in a fresh child process that samples its own RSS and reads ``VmHWM`` from ``/proc/self/status`` at the
end, so the figures are the whole process's peak. Results go to ``models/RESULTS_scale.md``.

    python benchmarks/scale.py --case stack:44:1024              # 2.75 GiB stack: ~15 min, shared 2 cores
    python benchmarks/scale.py --case decoder:28:1600 --no-budget  # 1.02 B decoder: ~50 min, shared 2 cores
    python benchmarks/scale.py --case decoder:28:1600 --no-ratio   # its params budget, no verify: ~47 min
    python benchmarks/scale.py --workdir /tmp/scale              # the full set: several hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

OPSET = 17
_CORE = 32  # rank of the dominant part of every generated weight


class _Writer:
    """Initializers appended to one external-data file, never all in memory."""

    def __init__(self, data: Path, seed: int) -> None:
        self.data = data
        self.handle = data.open("wb")
        self.offset = 0
        self.rng = np.random.default_rng(seed)
        self.tensors: list[TensorProto] = []
        self.noise = np.empty(0, np.float32)

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        raw = array.tobytes()
        for key, value in (("location", self.data.name), ("offset", self.offset), ("length", len(raw))):
            tensor.external_data.add(key=key, value=str(value))
        self.handle.write(raw)
        self.offset += len(raw)
        pad = -self.offset % 4096  # page-aligned, as onnx writes it
        self.handle.write(b"\0" * pad)
        self.offset += pad
        self.tensors.append(tensor)
        return name

    def weight(self, name: str, rows: int, cols: int) -> str:
        """A [rows, cols] weight: a rank-_CORE part with decaying singular values, plus noise (a slice of
        one shared noise pool at a random offset: generating fresh noise dominated the run on 2 cores)."""
        core = min(_CORE, rows, cols)
        decay = np.exp(-np.arange(core) / (core / 4)).astype(np.float32)
        left = self.rng.standard_normal((rows, core), dtype=np.float32) * decay
        right = self.rng.standard_normal((core, cols), dtype=np.float32)
        matrix = left @ right / np.sqrt(core)
        size = rows * cols
        if len(self.noise) < size + 1:
            self.noise = self.rng.standard_normal(2 * size, dtype=np.float32)
        start = int(self.rng.integers(0, len(self.noise) - size + 1))
        matrix += 0.05 * self.noise[start : start + size].reshape(rows, cols)
        return self.add(name, matrix / np.sqrt(rows))

    def vector(self, name: str, size: int, value: float | None = None) -> str:
        if value is None:
            return self.add(name, 0.02 * self.rng.standard_normal(size, dtype=np.float32))
        return self.add(name, np.full(size, value, np.float32))

    def close(self) -> None:
        self.handle.close()


def _save(path: Path, writer: _Writer, nodes, inputs, outputs, small=()) -> None:
    writer.close()
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, [*writer.tensors, *small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    path.write_bytes(model.SerializeToString())


def make_stack(path: Path, layers: int, width: int, hidden: int = 16 * 1024) -> None:
    """x [N, width] → (MatMul up to ``hidden``, Relu, MatMul down to ``width``) × layers/2: MLP blocks.

    16× wide blocks keep each SVD cheap (a width² Gram) while every weight is 64 MiB, as in LLM MLPs."""
    writer = _Writer(path.with_suffix(".onnx.data"), seed=layers * 7 + width)
    nodes, current = [], "x"
    for i in range(layers):
        rows, cols = (width, hidden) if i % 2 == 0 else (hidden, width)
        weight = writer.weight(f"w{i}", rows, cols)
        nodes.append(helper.make_node("MatMul", [current, weight], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        current = f"r{i}"
    nodes[-1].output[0] = "y"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", width]) for n in ("x", "y")]
    _save(path, writer, nodes, io[:1], io[1:])


def make_decoder(path: Path, layers: int, width: int, vocab: int, heads: int) -> int:
    """A GPT-2-shaped decoder: input_ids [batch, seq] → logits [batch, seq, vocab]; returns its params."""
    writer = _Writer(path.with_suffix(".onnx.data"), seed=layers * 13 + width)
    head = width // heads
    small = [
        helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, head]),
        helper.make_tensor("merged_shape", TensorProto.INT64, [3], [0, 0, width]),
        helper.make_tensor("split", TensorProto.INT64, [3], [width] * 3),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(head)]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("rsqrt2", TensorProto.FLOAT, [], [1.0 / np.sqrt(2.0)]),
    ]
    node = helper.make_node
    writer.noise = writer.rng.standard_normal(vocab * width + 2**24, dtype=np.float32)  # one pool for all
    wte = writer.add("wte", 0.02 * writer.noise[: vocab * width].reshape(vocab, width))
    nodes = [node("Gather", [wte, "input_ids"], ["h"], name="embed")]
    current = "h"

    def norm(name: str, x: str) -> str:
        gamma, beta = writer.vector(f"{name}.g", width, 1.0), writer.vector(f"{name}.b", width, 0.0)
        nodes.append(node("LayerNormalization", [x, gamma, beta], [f"{name}.y"], name=name, axis=-1))
        return f"{name}.y"

    def linear(name: str, x: str, rows: int, cols: int) -> str:
        weight, bias = writer.weight(f"{name}.w", rows, cols), writer.vector(f"{name}.b", cols)
        nodes.append(node("MatMul", [x, weight], [f"{name}.mm"], name=name))
        nodes.append(node("Add", [f"{name}.mm", bias], [f"{name}.y"], name=f"{name}.bias"))
        return f"{name}.y"

    for i in range(layers):
        p = f"l{i}"
        qkv = linear(f"{p}.qkv", norm(f"{p}.ln1", current), width, 3 * width)
        nodes.append(
            node("Split", [qkv, "split"], [f"{p}.q", f"{p}.k", f"{p}.v"], name=f"{p}.split", axis=-1)
        )
        for t in "qkv":
            nodes.append(node("Reshape", [f"{p}.{t}", "heads_shape"], [f"{p}.{t}4"], name=f"{p}.{t}.heads"))
        nodes += [
            node("Transpose", [f"{p}.q4"], [f"{p}.qt"], name=f"{p}.qt", perm=[0, 2, 1, 3]),
            node("Transpose", [f"{p}.k4"], [f"{p}.kt"], name=f"{p}.kt", perm=[0, 2, 3, 1]),
            node("Transpose", [f"{p}.v4"], [f"{p}.vt"], name=f"{p}.vt", perm=[0, 2, 1, 3]),
            node("MatMul", [f"{p}.qt", f"{p}.kt"], [f"{p}.s"], name=f"{p}.scores"),
            node("Mul", [f"{p}.s", "scale"], [f"{p}.ss"], name=f"{p}.scale"),
            node("Softmax", [f"{p}.ss"], [f"{p}.a"], name=f"{p}.softmax", axis=-1),
            node("MatMul", [f"{p}.a", f"{p}.vt"], [f"{p}.c"], name=f"{p}.context"),
            node("Transpose", [f"{p}.c"], [f"{p}.ct"], name=f"{p}.ct", perm=[0, 2, 1, 3]),
            node("Reshape", [f"{p}.ct", "merged_shape"], [f"{p}.cm"], name=f"{p}.merge"),
        ]
        attn = linear(f"{p}.proj", f"{p}.cm", width, width)
        nodes.append(node("Add", [current, attn], [f"{p}.r1"], name=f"{p}.res1"))
        fc = linear(f"{p}.fc", norm(f"{p}.ln2", f"{p}.r1"), width, 4 * width)
        nodes += [  # GELU (erf form): 0.5·x·(1 + erf(x/√2))
            node("Mul", [fc, "rsqrt2"], [f"{p}.g1"], name=f"{p}.g1"),
            node("Erf", [f"{p}.g1"], [f"{p}.g2"], name=f"{p}.g2"),
            node("Add", [f"{p}.g2", "one"], [f"{p}.g3"], name=f"{p}.g3"),
            node("Mul", [fc, f"{p}.g3"], [f"{p}.g4"], name=f"{p}.g4"),
            node("Mul", [f"{p}.g4", "half"], [f"{p}.gelu"], name=f"{p}.gelu"),
        ]
        mlp = linear(f"{p}.down", f"{p}.gelu", 4 * width, width)
        nodes.append(node("Add", [f"{p}.r1", mlp], [f"{p}.out"], name=f"{p}.res2"))
        current = f"{p}.out"
    final = norm("ln_f", current)
    head_weight = writer.weight("lm_head.w", width, vocab)
    nodes.append(node("MatMul", [final, head_weight], ["logits"], name="lm_head"))
    params = sum(int(np.prod(t.dims)) for t in writer.tensors)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])
    _save(path, writer, nodes, [ids], [logits], small)
    return params


# --- child: one compression, measured from inside -------------------------------------------------


def _status_mib(*keys: str) -> tuple[float, ...]:
    values = dict.fromkeys(keys, 0.0)
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in values:
            values[key] = int(line.split()[1]) / 1024
    return tuple(values[k] for k in keys)


def child(args: argparse.Namespace) -> None:
    import lrdeploy

    samples: list[tuple[float, float, float]] = []  # (seconds, RSS, anonymous RSS) in MiB
    start = time.perf_counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            rss, anon = _status_mib("VmRSS", "RssAnon")
            samples.append((time.perf_counter() - start, rss, anon))

    threading.Thread(target=sample, daemon=True).start()
    options = json.loads(args.options)
    halfway: list[float] = []  # when the original has run over every verification batch

    def progress(step: str, done: int, total: int) -> None:
        if step == "verify" and not halfway and 2 * done >= total:
            halfway.append(time.perf_counter() - start)

    _, report = lrdeploy.compress(args.model, output=args.output, progress=progress, **options)
    wall = time.perf_counter() - start
    stop.set()
    # where the peak was: the step running when RSS was highest (timings are in step order)
    peak_at, peak, _ = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0, 0.0)
    anon_peak = max((s[2] for s in samples), default=0.0)
    elapsed, phase, bounds = 0.0, "?", []
    for step, seconds in report.timings.items():  # steps in order of first use (approximate bounds)
        bounds.append((step, elapsed, elapsed + seconds))
        elapsed += seconds
        if phase == "?" and elapsed >= peak_at:
            phase = step
    if halfway:  # verification's two halves: the original's session, then the compressed model's
        index = next(i for i, bound in enumerate(bounds) if bound[0] == "verify")
        low, middle = bounds[index][1], max(halfway[0], bounds[index][1])
        bounds[index : index + 1] = [("verify original", low, middle), ("verify compressed", middle, wall)]
    by_step = {
        step: max((s[2] for s in samples if low <= s[0] <= high + 0.5), default=0.0)
        for step, low, high in bounds
    }
    print(
        json.dumps(
            {
                "wall_s": wall,
                "vmhwm_mib": _status_mib("VmHWM")[0],
                "peak_sampled_mib": peak,
                "peak_anon_mib": anon_peak,
                "anon_mib_by_step": by_step,
                "peak_phase": phase,
                "timings": report.timings,
                "params_before": report.params_before,
                "params_after": report.params_after,
                "macs_before": report.macs_before,
                "macs_after": report.macs_after,
                "verification": report.verification.to_dict() if report.verification else None,
            }
        )
    )


# --- parent: generate, run, tabulate ----------------------------------------------------------------


def _files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _measure(model: Path, output: Path, options: dict) -> dict:
    command = [sys.executable, __file__, "child", str(model), str(output), json.dumps(options)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["input_bytes"] = _files_size(model)
    result["output_bytes"] = _files_size(output)
    return result


def _row(label: str, options: dict, result: dict) -> str:
    gib = 2**30
    out_gib = result["output_bytes"] / gib
    hwm = result["vmhwm_mib"] / 1024
    anon = result.get("peak_anon_mib", 0.0) / 1024
    outputs = (result["verification"] or {}).get("outputs") or [{}]
    cosine = outputs[0].get("cosine")
    timings = ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items())
    return (
        f"| {label} | {json.dumps(options)} | {result['params_before'] / 1e9:.3f} B → "
        f"{result['params_after'] / 1e9:.3f} B | {result['input_bytes'] / gib:.2f} → {out_gib:.2f} | "
        f"{result['wall_s']:.0f} ({timings}) | {hwm:.2f} = {hwm / out_gib:.2f}× out "
        f"(at {result['peak_phase']}; anonymous {anon:.2f}) | "
        f"{'n/a' if cosine is None else f'{cosine:.4f}'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lrdeploy-scale"))
    parser.add_argument("--only", choices=("stack", "decoder"), default=None)
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent.parent / "models/RESULTS_scale.md"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        help="KIND:LAYERS:WIDTH instead of the default set (repeatable)",
    )
    parser.add_argument("--no-budget", action="store_true", help="decoders: the rank-ratio run only")
    parser.add_argument("--no-ratio", action="store_true", help="decoders: the params-budget run only")
    parser.add_argument("--no-verify", action="store_true", help="with --case: compress without verifying")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, Path, dict, float]] = []
    rows: list[str] = []
    cases = []
    if args.only in (None, "stack"):
        cases.append(("stack 44×(1024×16384)", "stack", dict(layers=44, width=1024), [{"rank_ratio": 0.25}]))
    if args.only in (None, "decoder"):
        ids = {"input_shapes": {"input_ids": [1, 32]}}
        budgets = [{"rank_ratio": 0.25, **ids}, {"target_params": 0.5, "verify": False, **ids}]
        cases.append(("decoder 14×1600", "decoder", dict(layers=14, width=1600), budgets[:1]))
        cases.append(("decoder 28×1600", "decoder", dict(layers=28, width=1600), budgets))
        cases.append(("decoder 14×2048", "decoder", dict(layers=14, width=2048), budgets[:1]))
    if args.case:
        ids = {"input_shapes": {"input_ids": [1, 32]}}
        budgets = [{"rank_ratio": 0.25, **ids}, {"target_params": 0.5, "verify": False, **ids}]
        budgets = budgets[:1] if args.no_budget else budgets[1:] if args.no_ratio else budgets
        cases = []
        for case in args.case:
            kind, layers, width = case.split(":")
            options = [{"rank_ratio": 0.25}] if kind == "stack" else budgets
            options = [{**o, "verify": False} for o in options] if args.no_verify else options
            cases.append(
                (f"{kind} {layers}×{width}", kind, dict(layers=int(layers), width=int(width)), options)
            )
    for label, kind, shape, option_sets in cases:
        model = args.workdir / f"{kind}_{shape['layers']}x{shape['width']}.onnx"
        start = time.perf_counter()
        if kind == "stack":
            make_stack(model, **shape)
        else:
            make_decoder(model, **shape, vocab=50257, heads=25 if shape["width"] == 1600 else 16)
        generated = time.perf_counter() - start
        print(
            f"{label}: generated {model} ({_files_size(model) / 2**30:.2f} GiB) in {generated:.0f} s",
            flush=True,
        )
        for options in option_sets:
            output = args.workdir / f"{model.stem}.lowrank.onnx"
            result = _measure(model, output, options)
            print(json.dumps(result), flush=True)
            rows.append(_row(label, options, result))
            runs.append((label, model, options, result["wall_s"]))
            for path in args.workdir.glob(output.name + "*"):
                path.unlink()
        if not args.keep:
            for path in args.workdir.glob(model.name + "*"):
                path.unlink()
    header = [
        "# Scale: time and peak memory on multi-GB models",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (this project's 2-core CPU container, shared "
        "with other jobs), 23 GB RAM. Command: `python benchmarks/scale.py` (models generated with random "
        "low-rank-plus-noise weights, external data; each compression in a fresh child process; peak = the "
        "child's VmHWM, which includes onnxruntime's sessions of both models during verification).",
        "",
        "| model | options | params | files GiB (in → out) | wall s (steps) | peak RSS GiB | verify cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    args.results.write_text(text)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        parser = argparse.ArgumentParser()
        parser.add_argument("mode")
        parser.add_argument("model")
        parser.add_argument("output")
        parser.add_argument("options")
        child(parser.parse_args())
    else:
        main()
