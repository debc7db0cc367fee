"""The offline demo, tiny models, and the GPU benchmarks' helpers."""
