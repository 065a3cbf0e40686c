"""The levers beside sparsity: step caches, FP8 linear layers, multi-GPU sampling."""
