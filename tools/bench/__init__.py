"""Benchmarks: receive throughput and end-to-end latency of the node."""
