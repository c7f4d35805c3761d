"""Execution backends: serial, threads, processes (and dask, where installed)."""
