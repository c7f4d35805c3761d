# cython: language_level=3
"""amorsize's compiled core: the code that runs once per call or once per item.

Everything here takes and returns plain numbers (or calls a callable it was handed);
validation and normalisation happen once, in the Python modules that build policies.
Each concept keeps its part in its own include file so that it can be read alone:

* ``_core_common.pxi``  the CPython API and the C helpers the call paths share
* ``_core_retry.pxi``   backoff delay, jitter sampling, the retry decision and call loop
* ``_core_model.pxi``   the optimizer's cost model: chunk sizes and worker counts
* ``_core_circuit.pxi`` the circuit breaker's state check on the call path
* ``_core_checkpoint.pxi`` the item hashes a checkpointed run records
* ``_core_budget.pxi``  C atomics and clocks on shared slots; the retry budget's counters
* ``_core_limit.pxi``   the rate limiter's GCRA slot
* ``_core_serial.pxi``  the serial fast path's per-item loop (``execute``, ``execute_iter``)
* ``_core_watch.pxi``   the waits of sampling's watcher thread, without the GIL

Names. The include files are one module: they share one C namespace and one module
namespace, so a name says where it lives:

* CPython API functions are declared once, in ``_core_common.pxi``, under their own C names;
* C written verbatim (``cdef extern from *`` blocks) is ``amz_*`` / ``AMZ_*``, clear of
  Python.h's and Cython's names;
* Cython helpers shared by several include files have a plain ``_`` name
  (``_fetch_exception``, ``_reraise``, ``_steal``, ``_importable_as``) and live in
  ``_core_common.pxi``;
* every other private name starts with its include file's concept: ``_retry_`` (the retry
  coroutine's helpers ``_retry_coro_``), ``_model_``, ``_circuit_``, ``_ckpt_``,
  ``_budget_``, ``_limit_``, ``_serial_``, ``_watch_``; constants
  likewise (``_RETRY_JITTER_FULL``, ``_MODEL_GRID_STEP``, ``_CIRCUIT_OPEN``);
* public names (no underscore) and the private hooks the Python modules call
  (``_set_testing_state``, ``_RetryPolicyCore``) are listed in ``_core.pyi``, which
  ``tests/test_core_stubs.py`` checks against the compiled module.
"""

include "_core_common.pxi"
include "_core_budget.pxi"   # before retry: policies hold a budget
include "_core_limit.pxi"
include "_core_retry.pxi"
include "_core_model.pxi"
include "_core_circuit.pxi"
include "_core_checkpoint.pxi"
include "_core_serial.pxi"
include "_core_watch.pxi"
