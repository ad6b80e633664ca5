"""Model optimization: quantization, pruning and low-rank factorization, each measured."""
