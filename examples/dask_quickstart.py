"""Run ``execute`` on a Dask cluster: a local one here, a real one by changing one line.

Run it with ``python examples/dask_quickstart.py`` (a few seconds: it starts 2 worker
processes). Needs the extra: ``pip install 'amorsize[dask]'``.

1. ``optimize(..., backends=("dask",), client=client)`` plans for the cluster: it counts the
   workers, measures what one task costs on this scheduler, and batches small items.
2. ``execute(..., backend="dask", client=client)`` runs that plan; results come back in
   input order, equal to the serial ones.
3. With ``backend="auto"`` and a client, dask is one of the candidates next to serial,
   processes and threads; the fastest predicted plan wins.

For a real cluster, replace the LocalCluster by ``Client("tcp://scheduler:8786")``: the
workers need amorsize installed (functions defined in this script travel by value).
"""

from __future__ import annotations

import logging
import time

from amorsize import execute, optimize


def score(x: int) -> int:
    """About 0.2 ms of pure-Python work."""
    end = time.perf_counter() + 0.0002
    s = x
    while time.perf_counter() < end:
        s = (s * 31 + 7) % 1_000_003
    return x * x


def main() -> None:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print("dask.distributed is not installed: pip install 'amorsize[dask]'")
        return
    data = list(range(4000))
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=":0",  # any free port: never collides with another cluster
            # Closing a LocalCluster while a worker's heartbeat is on its way logs that
            # worker's "Failed to communicate with scheduler" with a traceback, on a busy
            # machine now and then (dask/distributed#7105): errors of this script still
            # raise in this process.
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,  # a real cluster: Client("tcp://scheduler:8786")
    ):
        print("1. the plan for this cluster")
        plan = optimize(score, data, backends=("dask",), client=client)
        print(f"  dask: n_jobs={plan.n_jobs}, chunksize={plan.chunksize}")
        print(f"  why: {plan.reason}")

        print("2. run it")
        results, run = execute(score, data, backend="dask", client=client, return_plan=True)
        print(f"  {run.items} items in {run.wall_seconds:.2f} s, chunksize {run.chunksize}")
        same = results == [x * x for x in data]
        print(f"  results equal the serial ones: {'yes' if same else 'NO'}")

        print("3. backend='auto' with a client: dask competes with the local backends")
        _, auto = execute(score, data, client=client, return_plan=True)
        print(f"  chosen: {auto.backend} (n_jobs={auto.n_jobs}, chunksize={auto.chunksize})")


if __name__ == "__main__":
    main()
