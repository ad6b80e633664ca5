"""Benchmarks: each runs quanta and the peer it is compared with, in one run."""
