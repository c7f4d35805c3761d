# Optimizer cost model (chunk sizes, worker counts): filled in by the optimizer.
