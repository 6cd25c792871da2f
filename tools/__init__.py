"""Scripts around the node: the model workflow, the dev stack, benchmarks, and the entry scripts on top."""
