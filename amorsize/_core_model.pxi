# Optimizer cost model: predicted wall time of serial / processes(n, c) / threads(n, c)
# runs, and the search over worker counts and chunk sizes.
#
# Plain numbers in and out: the optimizer fills two structs from the sampled profile and the
# machine facts (Python dicts convert to them; their keys are the TypedDicts of the same
# names in amorsize/_model_types.py); nothing here validates or does I/O.
#
# Timeline of a process run, as modelled (one parent, n workers, K = ceil(N / c) chunks):
#
#   start-up ─▶ first chunk out ─▶ [ workers compute | parent pickles inputs, unpickles
#   results: a serial stream ] ─▶ tail: the last chunks finish unevenly ─▶ last chunk back
#
# The parallel middle lasts as long as its slowest constraint: the work spread over the
# workers, the CPU time of workers and parent spread over the usable cores, or the parent's
# serial stream alone.

from libc.math cimport ceil, floor, log, sqrt

cdef struct Workload:
    double n_items          # items still to run (the sampled ones are already done)
    double t_mean           # wall seconds per item
    double t_std            # spread of wall seconds per item
    double t_max            # slowest sampled item
    double cpu_fraction     # CPU seconds / wall seconds of an item, clipped to [0, 1]
    double in_bytes         # pickled input per item
    double out_bytes        # pickled output per item
    double in_dump_s        # parent: pickle one input (amortised over a chunk)
    double in_load_s        # worker: unpickle one input
    double out_dump_s       # worker: pickle one output
    double out_load_s       # parent: unpickle one output
    double mem_per_item     # bytes a worker holds per item in flight
    double func_bytes       # pickled function, sent once per worker
    double thread_overlap   # CPU share that ran in parallel on two threads (0: unknown)

cdef struct Machine:
    double cores                    # usable cores (affinity, quota)
    double proc_startup_s           # first process worker: start + first round trip
    double proc_startup_per_worker_s
    double warm_workers             # process workers already running (no start-up)
    double proc_roundtrip_s         # one small message to a worker and back
    double per_byte_s               # moving one byte through a pipe
    double parent_item_s            # executor bookkeeping per item in the parent
    double worker_rss               # resident bytes of an idle worker
    double available_memory
    double thread_startup_s         # start one pool thread (in the parent, one at a time)
    double thread_roundtrip_s       # parent time per task handed to a thread pool
    double warm_threads             # size of the warm thread pool (its threads run already)

# Backend codes in the tuples returned by model_search.
cdef enum:
    _MODEL_SERIAL = 0
    _MODEL_PROCESSES = 1
    _MODEL_THREADS = 2

# Fraction of available memory the workers may use together (the rest is the parent's
# and the system's headroom).
cdef double _MODEL_MEMORY_SHARE = 0.8
# Pure-Python CPU work on several threads runs a little slower than on one (GIL hand-offs,
# cache misses): about 10% on CPython 3.11 in benchmarks/bench_quality.py's 1 ms workload.
cdef double _MODEL_GIL_CONTENTION = 1.10
# Chunk-size grid step: fine enough that the best grid point is within ~12% of the optimum
# of a smooth cost curve, coarse enough that the whole search costs microseconds.
cdef double _MODEL_GRID_STEP = 1.25


cpdef double model_serial_seconds(Workload w) noexcept:
    """Predicted wall seconds for running the remaining items in this process.

    ``n_items * t_mean``: no overhead at all, which is what parallel plans must beat.
    """
    return w.n_items * w.t_mean


cdef inline double _model_tail(double n_active, double chunk_s, double chunk_std) noexcept:
    """Expected extra time of the last, unevenly finishing chunks over a perfect split.

    With dynamic scheduling each worker idles on average about half a chunk at the end;
    item-time spread adds the expected maximum of n normal deviations (sqrt(2 ln n) sigma).
    """
    if n_active <= 1.0:
        return 0.0
    return 0.5 * chunk_s * (1.0 - 1.0 / n_active) + chunk_std * sqrt(2.0 * log(n_active))


cpdef long long model_max_workers_for_memory(Workload w, Machine m, double chunksize) noexcept:
    """How many process workers fit in memory with ``chunksize`` items in flight each."""
    cdef double footprint = m.worker_rss + w.mem_per_item + 2.0 * chunksize * (
        w.in_bytes + w.out_bytes)
    if m.available_memory <= 0.0 or footprint <= 0.0:
        return 1 << 30
    return <long long>floor(_MODEL_MEMORY_SHARE * m.available_memory / footprint)


cpdef double model_process_seconds(Workload w, Machine m, double n, double c) noexcept:
    """Predicted wall seconds for ``n`` process workers taking chunks of ``c`` items."""
    cdef double N = w.n_items
    if N <= 0.0:
        return 0.0
    if c < 1.0:
        c = 1.0
    cdef double K = ceil(N / c)
    cdef double n_active = n if n < K else K
    cdef double cold = n - m.warm_workers
    cdef double startup = 0.0
    if cold > 0.0:
        startup = m.proc_startup_s + m.proc_startup_per_worker_s * (cold - 1.0)
    startup += n * w.func_bytes * m.per_byte_s
    # Per item, split between the parent (a serial stream) and the workers (parallel).
    cdef double parent_item = (w.in_dump_s + w.out_load_s + m.parent_item_s
                               + (w.in_bytes + w.out_bytes) * m.per_byte_s)
    cdef double worker_item = w.t_mean + w.in_load_s + w.out_dump_s
    cdef double worker_cpu_item = w.t_mean * w.cpu_fraction + w.in_load_s + w.out_dump_s
    cdef double parent_total = N * parent_item + K * 0.5 * m.proc_roundtrip_s
    cdef double worker_total = N * worker_item + K * 0.5 * m.proc_roundtrip_s
    cdef double cpu_total = N * worker_cpu_item + parent_total
    cdef double middle = worker_total / n_active
    cdef double by_cores = cpu_total / m.cores
    if by_cores > middle:
        middle = by_cores
    if parent_total > middle:
        middle = parent_total
    # A chunk's duration stretches when more CPU-bound workers than cores share them.
    cdef double stretch = n_active * w.cpu_fraction / m.cores
    if stretch < 1.0:
        stretch = 1.0
    cdef double chunk_s = c * worker_item * stretch
    cdef double tail = _model_tail(n_active, chunk_s, sqrt(c) * w.t_std * stretch)
    cdef double total = middle + tail
    # No run is shorter than its slowest chunk, nor than its slowest item.
    if chunk_s + w.t_max > total:
        total = chunk_s + w.t_max
    # Pipeline fill and drain: the first chunk goes out before anyone works, the last
    # chunk's results come back after everyone is done.
    total += c * parent_item + m.proc_roundtrip_s
    return startup + total


cpdef double model_thread_seconds(Workload w, Machine m, double n, double c) noexcept:
    """Predicted wall seconds for ``n`` threads taking chunks of ``c`` items.

    An item's wall time is waiting (it overlaps on any number of threads) plus CPU time.
    Of the CPU time, the share ``thread_overlap`` (measured: two items on two threads)
    runs in parallel on up to one core per thread and the rest holds the GIL, one thread
    at a time, as the parent's start-ups and hand-outs do (Amdahl's law, with the
    measured overlap as the parallel fraction). The parent starts the threads of a cold
    pool and hands out tasks one by one, so the last thread of the first wave starts last.
    """
    cdef double N = w.n_items
    if N <= 0.0:
        return 0.0
    if c < 1.0:
        c = 1.0
    cdef double K = ceil(N / c)
    cdef double n_active = n if n < K else K
    cdef double overlap = w.thread_overlap
    if overlap < 0.0:
        overlap = 0.0
    elif overlap > 1.0:
        overlap = 1.0
    cdef double lanes = n_active if n_active < m.cores else m.cores
    if lanes < 1.0:
        lanes = 1.0
    cdef double cpu_item = w.t_mean * w.cpu_fraction
    cdef double gil_item = cpu_item * (1.0 - overlap) * (
        _MODEL_GIL_CONTENTION if n_active > 1.0 else 1.0)
    # One item's CPU time when n_active threads share the GIL and the cores.
    cdef double cpu_share = gil_item + cpu_item * overlap / lanes
    cdef double item = w.t_mean
    if gil_item > item:
        item = gil_item
    cdef double task = m.thread_roundtrip_s
    # The ramp: the parent starts the threads of a cold pool and hands each its first task,
    # one by one; on average a thread starts half-way through it.
    cdef double cold = 0.0 if n == m.warm_threads else n_active
    cdef double ramp = cold * m.thread_startup_s + n_active * task
    # Lower bounds of the parallel middle: the work spread over the threads; the CPU work
    # under the GIL and on the cores, with the parent's (it holds the GIL too).
    cdef double middle = N * item / n_active + 0.5 * ramp
    cdef double cpu_total = (N * (cpu_share + m.parent_item_s) + K * task
                             + cold * m.thread_startup_s)
    if cpu_total > middle:
        middle = cpu_total
    # A chunk lasts longer while the threads compete for the GIL and the cores.
    cdef double stretch = 1.0
    if item > 0.0 and n_active * cpu_share > item:
        stretch = n_active * cpu_share / item
    cdef double chunk_s = c * item
    # Equal chunks finish in waves: the last wave is partly idle (none when K / n_active
    # is whole, up to a chunk otherwise); item-time spread adds the expected maximum.
    cdef double tail = (ceil(K / n_active) - K / n_active) * chunk_s
    if n_active > 1.0:
        tail += sqrt(c) * w.t_std * stretch * sqrt(2.0 * log(n_active))
    cdef double total = middle + tail
    # No run ends before the last thread started gets through a chunk holding the slowest
    # item.
    cdef double last = ramp + ((c - 1.0) * item + w.t_max) * stretch
    if last > total:
        total = last
    return total + task


cpdef double model_parallel_floor(Workload w, Machine m, bint processes, bint threads) noexcept:
    """A lower bound on every process plan's (``processes``) and thread plan's
    (``threads``) predicted seconds, whatever the worker count and chunk size; ``1e300``
    when neither is asked for. Where serial beats it by the optimizer's margin, no plan
    needs predicting (a cold 7 ms run of 0.1 us items spent ~1 % of its time searching).

    Processes: the cheapest start-up, the function sent once, the parent's share of every
    item (pickling, hand-out, receiving) or all the CPU work over the cores, whichever is
    more, and one round trip. Threads: the CPU work that holds the GIL, the rest spread
    over the cores, and the parent's hand-out of each item.
    """
    cdef double N = w.n_items
    cdef double best = 1e300, t
    if N <= 0.0:
        return 0.0
    cdef double parent_item = (w.in_dump_s + w.out_load_s + m.parent_item_s
                               + (w.in_bytes + w.out_bytes) * m.per_byte_s)
    cdef double worker_cpu_item = w.t_mean * w.cpu_fraction + w.in_load_s + w.out_dump_s
    cdef double cores = m.cores if m.cores >= 1.0 else 1.0
    cdef double overlap = w.thread_overlap
    if overlap < 0.0:
        overlap = 0.0
    elif overlap > 1.0:
        overlap = 1.0
    cdef double cpu_item = w.t_mean * w.cpu_fraction
    if processes:
        t = N * parent_item
        if N * (worker_cpu_item + parent_item) / cores > t:
            t = N * (worker_cpu_item + parent_item) / cores
        t += parent_item + m.proc_roundtrip_s + w.func_bytes * m.per_byte_s
        if m.warm_workers < 1.0:
            t += m.proc_startup_s
        best = t
    if threads:
        t = N * (cpu_item * (1.0 - overlap) + cpu_item * overlap / cores + m.parent_item_s)
        t += m.thread_roundtrip_s
        if t < best:
            best = t
    return best


cdef double _model_best_chunk(Workload w, Machine m, int backend, double n,
                              double *best_c) noexcept:
    """Search chunk sizes 1 .. ceil(N / n) on a geometric grid; return the best time."""
    cdef double N = w.n_items
    cdef double top = ceil(N / n)
    cdef double c = 1.0, t, best = 1e300
    cdef double extra[3]
    cdef int i
    extra[0] = top
    extra[1] = ceil(N / (2.0 * n))
    extra[2] = ceil(N / (4.0 * n))
    best_c[0] = 1.0
    while True:
        if backend == _MODEL_PROCESSES:
            if model_max_workers_for_memory(w, m, c) < n:
                break
            t = model_process_seconds(w, m, n, c)
        else:
            t = model_thread_seconds(w, m, n, c)
        if t < best:
            best = t
            best_c[0] = c
        if c >= top:
            break
        c = floor(c * _MODEL_GRID_STEP) if floor(c * _MODEL_GRID_STEP) > c else c + 1.0
        if c > top:
            c = top
    for i in range(3):
        c = extra[i]
        if c < 1.0:
            continue
        if backend == _MODEL_PROCESSES:
            if model_max_workers_for_memory(w, m, c) < n:
                continue
            t = model_process_seconds(w, m, n, c)
        else:
            t = model_thread_seconds(w, m, n, c)
        if t < best:
            best = t
            best_c[0] = c
    return best


cpdef list model_search(Workload w, Machine m, list process_ns, list thread_ns):
    """Best chunk size for each candidate worker count; ``(backend, n, chunksize, seconds)``.

    ``backend`` is 0 serial, 1 processes, 2 threads; the list is sorted fastest first and
    always holds the serial candidate. Worker counts that do not fit in memory are skipped.
    """
    cdef list out = [(_MODEL_SERIAL, 1, 1, model_serial_seconds(w))]
    cdef double best_c = 1.0, t
    cdef long long n
    if w.n_items <= 0.0:
        return out
    for n in process_ns:
        if n < 1:
            continue
        t = _model_best_chunk(w, m, _MODEL_PROCESSES, <double>n, &best_c)
        if t < 1e300:
            out.append((_MODEL_PROCESSES, n, <long long>best_c, t))
    for n in thread_ns:
        if n < 1:
            continue
        t = _model_best_chunk(w, m, _MODEL_THREADS, <double>n, &best_c)
        if t < 1e300:
            out.append((_MODEL_THREADS, n, <long long>best_c, t))
    out.sort(key=_model_seconds_key)
    return out


def _model_seconds_key(tuple cand):
    return cand[3]
