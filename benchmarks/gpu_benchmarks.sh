#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, on a machine with onnxruntime-gpu and lrdeploy installed
# (pip install ".[gpu]"): the CUDA EP checks, then ResNet-50 and the bundled models at rank ratios
# 1.0/0.5/0.25, batch 1 and 32, with TF32 (onnxruntime's default), without it, and as CUDA graphs.
#
#   bash benchmarks/gpu_benchmarks.sh [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$repo/out/gpu}" && cd "${1:-$repo/out/gpu}" && pwd)
work=$(mktemp -d)
cd /tmp  # run the installed package, not the source tree's lrdeploy/ (which lacks lrdeploy.passes)

python3 -m lrdeploy env | tee "$out/env.txt"
python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_gpu.py" 2>&1 | tail -3 | tee "$out/gpu_tests.txt"
python3 -m lrdeploy compress "$repo/models/vgg_lrpet_keep_r0.160.onnx" --device cuda --data mnist \
    --overrides "$repo/models/vgg_lrpet_keep_r0.160.ranks.json" -o "$work/vgg.lowrank.onnx" | tee "$out/compress_cuda.txt"

latency="python3 $repo/benchmarks/latency.py"
$latency resnet50 --device cuda --batch 1,32 --workdir "$work" --out "$out/resnet50_cuda"
$latency resnet50 --device cuda --batch 1,32 --no-tf32 --workdir "$work" --out "$out/resnet50_cuda_fp32"
$latency resnet50 --device cuda --batch 1,32 --cuda-graph --workdir "$work" --out "$out/resnet50_cuda_graph"
# --rank-multiple 8 on ranks that are not already multiples of 8 (at 0.25 ResNet-50's are)
$latency resnet50 --device cuda --batch 1,32 --ratios 0.3 --multiple 8 --workdir "$work" --out "$out/resnet50_cuda_x8"
$latency resnet50 --device cuda --batch 1,32 --ratios 0.3 --multiple 8 --no-tf32 --workdir "$work" \
    --out "$out/resnet50_cuda_x8_fp32"
for model in vgg_lrpet_keep_r0.160 lenet5_baseline mlp_baseline; do
    $latency "$repo/models/$model.onnx" --device cuda --batch 1,32 --workdir "$work" --out "$out/${model}_cuda"
done

# Issue 10: latency-aware ranks on the CUDA EP, fp16, NHWC and CUDA graphs (the latency table is cached
# in $LRDEPLOY_CACHE, so each model is profiled once per setting).
export LRDEPLOY_CACHE="$out/cache"
python3 "$repo/benchmarks/make_resnet50.py" "$work/resnet50_bn.onnx"
for batch in 1 32; do
    python3 -m lrdeploy compress "$work/resnet50_bn.onnx" --device cuda --batch "$batch" --target-latency 0.4 \
        --random-batches 1 --batch-size 4 -o "$work/r50_lat_b$batch.onnx" --report "$out/r50_lat_b$batch.json"
    python3 -m lrdeploy compress "$work/resnet50_bn.onnx" --device cuda --batch "$batch" --target-latency 0.4 \
        --precision fp16 --random-batches 1 --batch-size 4 -o "$work/r50_lat_fp16_b$batch.onnx" \
        --report "$out/r50_lat_fp16_b$batch.json"
    python3 -m lrdeploy compress "$work/resnet50_bn.onnx" --rank-ratio 0.25 --precision fp16 --device cuda \
        --no-verify -o "$work/r50_r0.25_fp16.onnx"
    python3 -m lrdeploy compress "$work/resnet50_bn.onnx" --rank-ratio 1.0 --precision fp16 --device cuda \
        --no-verify -o "$work/r50_dense_fp16.onnx"
    for graph in "" "--cuda-graph"; do
        for tf32 in "--tf32" "--no-tf32"; do
            python3 -m lrdeploy bench "$work/resnet50_bn.onnx" "$work/r50_lat_b$batch.onnx" \
                "$work/r50_dense_fp16.onnx" "$work/r50_r0.25_fp16.onnx" "$work/r50_lat_fp16_b$batch.onnx" \
                --device cuda --batch "$batch" $graph $tf32 --json "$out/r50_b${batch}${graph}${tf32}.json" || true
        done
    done
done
python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_latency.py" -k cuda 2>&1 | tail -3 | tee "$out/latency_gpu_tests.txt"
