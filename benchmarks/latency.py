"""A model compressed at several rank ratios, timed side by side (interleaved) with `lrdeploy.runtime.bench`.

    python benchmarks/latency.py resnet50 --device cpu --threads 2 --batch 1      # README, CPU
    python benchmarks/latency.py resnet50 --device cuda --batch 1,32 --ratios 0.3 --multiple 8 # GPU
    python benchmarks/latency.py models/lenet5_baseline.onnx --device cpu --threads 2 --batch 1,32

``resnet50`` builds the ResNet-50 with BatchNorm kept (benchmarks/make_resnet50.py). Writes the models to
--workdir, the timings as JSON and a Markdown table to --out (.json/.md).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import onnx
from make_resnet50 import build_resnet50

import lrdeploy
from lrdeploy.runtime.bench import BenchConfig, benchmark
from lrdeploy.runtime.envinfo import collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an .onnx path, or 'resnet50'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ratios", default="1.0,0.5,0.25")
    parser.add_argument(
        "--multiple", type=int, default=0, help="also compress each ratio < 1 with --rank-multiple N"
    )
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: float32 math without TF32")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA: replay runs as CUDA graphs")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"))
    parser.add_argument("--out", type=Path, default=None, help="default: WORKDIR/NAME_DEVICE")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model == "resnet50":
        original = args.workdir / "resnet50_bn.onnx"
        if not original.exists():
            onnx.save(build_resnet50(), original)
    else:
        original = Path(args.model)
    stem = original.name.removesuffix(".onnx")
    variant = "_graph" if args.cuda_graph else "_fp32" if args.no_tf32 else ""
    out = args.out or args.workdir / f"{stem}_{args.device}{variant}"
    models = [original]
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [(r, 1) for r in ratios] + [(r, args.multiple) for r in ratios if args.multiple and r < 1]
    for ratio, multiple in variants:
        suffix = f"_x{multiple}" if multiple > 1 else ""
        target = args.workdir / f"{stem}_r{ratio:g}{suffix}.onnx"
        lrdeploy.compress(original, rank_ratio=ratio, rank_multiple=multiple, output=target, verify=False)
        models.append(target)
    config = BenchConfig(
        device=args.device,
        batch_sizes=tuple(int(b) for b in args.batch.split(",")),
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        tf32=not args.no_tf32,
        cuda_graph=args.cuda_graph,
    )
    result = benchmark([str(m) for m in models], config)
    info = collect()
    packages = info["packages"]
    runtime = packages.get("onnxruntime-gpu") or packages.get("onnxruntime")
    gpus = "; ".join(info.get("gpus") or []) or "no GPU"
    header = (
        f"machine: {platform.node()}, {info['cpus']} CPUs, {gpus}; provider {result.provider}; "
        f"onnxruntime {runtime}; threads {args.threads or 'default'}; "
        + (f"tf32 {not args.no_tf32}; cuda graph {args.cuda_graph}; " if args.device != "cpu" else "")
        + f"median of {args.runs} interleaved rounds after {args.warmup} warm-up\n\n"
    )
    table = header + result.to_markdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".md").write_text(table)
    out.with_name(out.name + ".json").write_text(json.dumps(result.to_dict() | {"env": info}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
