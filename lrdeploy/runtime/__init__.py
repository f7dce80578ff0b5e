"""Running models on onnxruntime: sessions on the right provider, input data, verification and benchmarks."""
