"""The dev stack: Redis, Orthanc, workers and the node, as tests, the demo and the benchmarks start them."""
