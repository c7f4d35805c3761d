# cython: language_level=3
"""amorsize's compiled core: the code that runs once per call or once per item.

Everything here takes and returns plain numbers (or calls a callable it was handed);
validation and normalisation happen once, in the Python modules that build policies.
Each concept keeps its part in its own include file so that it can be read alone:

* ``_core_retry.pxi``   backoff delay, jitter sampling, the retry decision and call loop
* ``_core_model.pxi``   the optimizer's cost model: chunk sizes and worker counts
* ``_core_circuit.pxi`` the circuit breaker's state check on the call path
* ``_core_checkpoint.pxi`` the item hashes a checkpointed run records
"""

include "_core_retry.pxi"
include "_core_model.pxi"
include "_core_circuit.pxi"
include "_core_checkpoint.pxi"
