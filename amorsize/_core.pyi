"""Type stubs for the compiled core ``amorsize._core``.

Kept by hand, checked against the compiled module by ``tests/test_core_stubs.py``
(``mypy.stubtest``: names, signatures, ``final`` classes). One section per include file.
"""

from collections.abc import Callable as _Callable
from collections.abc import Generator as _Generator
from collections.abc import Iterable as _Iterable
from types import CodeType as _CodeType
from typing import Any as _Any
from typing import Generic as _Generic
from typing import ParamSpec as _ParamSpec
from typing import TypeVar as _TypeVar
from typing import final as _final
from typing import overload as _overload

from amorsize._model_types import Machine as _Machine
from amorsize._model_types import Workload as _Workload

_RP = _ParamSpec("_RP")
_RR = _TypeVar("_RR")
_RT = _TypeVar("_RT")
# One row of model_search: (backend code 0 serial / 1 processes / 2 threads, workers,
# chunk size, predicted seconds).
_SearchRow = tuple[int, int, int, float]

# --- retry (_core_retry.pxi) -----------------------------------------------------------------
def backoff_delay(
    initial_delay: float, exponential_base: float, max_delay: float, attempt: int
) -> float: ...
def seed_jitter(seed: int) -> None: ...
def jitter_uniform() -> float: ...
def _set_testing_state(enabled: bool, max_retries: int) -> tuple[bool, int]: ...
def _set_exhausted_error(cls: type[BaseException]) -> None: ...
def callable_name(func: _Any) -> str: ...
def retry_call_core(
    func: _Callable[..., _RT],
    policy: _RetryPolicyCore,
    args: tuple[_Any, ...],
    kwargs: dict[str, _Any] | None,
) -> _RT: ...

class _RetryPolicyCore:
    _lowered: bool
    def _lower(
        self,
        max_retries: int,
        initial_delay: float,
        max_delay: float,
        exponential_base: float,
        jitter_mode: int,
        exc_types: tuple[type[BaseException], ...],
        on_retry: _Callable[..., object] | None,
        max_elapsed: float,
        retry_on_result: _Callable[[_Any], object] | None,
        reraise: bool,
        exc_excluded: tuple[type[BaseException], ...] = (),
    ) -> None: ...
    def calculate_delay(self, attempt: int, previous_delay: float | None = None) -> float: ...
    def should_retry(self, exception: BaseException | None, attempt: int) -> bool: ...

class RetryStats:
    @property
    def calls(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def exhausted(self) -> int: ...
    def reset(self) -> None: ...
    def as_dict(self) -> dict[str, int]: ...

class _RetryingBase(_Generic[_RP, _RR]):
    __wrapped__: _Callable[_RP, _RR]
    __name__: str
    __qualname__: str
    __module__: str
    def __init__(self, func: _Callable[_RP, _RR], policy: _RetryPolicyCore) -> None: ...
    # Called through the vectorcall slot, which the core sets at import (see the test).
    def __call__(self, *args: _RP.args, **kwargs: _RP.kwargs) -> _RR: ...
    @_overload
    def __get__(
        self, instance: None, owner: type | None = None, /
    ) -> _RetryingBase[_RP, _RR]: ...
    @_overload
    def __get__(self, instance: object, owner: type | None = None, /) -> _Callable[..., _RR]: ...
    @property
    def retry_policy(self) -> _Any: ...
    @property
    def retry_stats(self) -> RetryStats: ...
    @property
    def __code__(self) -> _CodeType: ...
    @property
    def __defaults__(self) -> tuple[_Any, ...] | None: ...
    @property
    def __kwdefaults__(self) -> dict[str, _Any] | None: ...

@_final
class RetryingFunction(_RetryingBase[_RP, _RR]):
    def call_outcome(self, *args: _RP.args, **kwargs: _RP.kwargs) -> tuple[bool, _Any, int]: ...

@_final
class RetryingItemFunction(_RetryingBase[_RP, _RR]): ...

@_final
class AsyncRetryingFunction(_RetryingBase[_RP, _RR]): ...

@_final
class RetryCoroutine:
    def __await__(self) -> _Generator[_Any, None, _Any]: ...
    def __next__(self) -> _Any: ...
    def send(self, value: _Any) -> _Any: ...
    def throw(self, typ: _Any, val: _Any = None, tb: _Any = None) -> _Any: ...
    def close(self) -> None: ...
    @property
    def __name__(self) -> str: ...
    @property
    def __qualname__(self) -> str: ...

# --- model (_core_model.pxi) -----------------------------------------------------------------
# The dicts are converted to the C structs of the same names; a missing key is a ValueError.
def model_serial_seconds(w: _Workload) -> float: ...
def model_process_seconds(w: _Workload, m: _Machine, n: float, c: float) -> float: ...
def model_thread_seconds(w: _Workload, m: _Machine, n: float, c: float) -> float: ...
def model_max_workers_for_memory(w: _Workload, m: _Machine, chunksize: float) -> int: ...
def model_search(
    w: _Workload, m: _Machine, process_ns: list[int], thread_ns: list[int]
) -> list[_SearchRow]: ...

# --- circuit (_core_circuit.pxi) -------------------------------------------------------------
CIRCUIT_CLOSED: int
CIRCUIT_OPEN: int
CIRCUIT_HALF_OPEN: int

class CircuitCore:
    state: int
    generation: int
    consecutive_failures: int
    failure_threshold: int
    failure_rate: float
    minimum_calls: int
    window: int
    window_calls: int
    window_failures: int
    total_successes: int
    total_failures: int
    # Built by __cinit__ (the ring buffer must exist before any method runs), hence __new__.
    def __new__(
        cls, failure_threshold: int, failure_rate: float, window: int, minimum_calls: int
    ) -> CircuitCore: ...
    def record_success(self, generation: int) -> None: ...
    def record_failure(self, generation: int) -> bool: ...
    def transition(self, state: int) -> int: ...

class CircuitGuarded:
    func: _Callable[..., _Any]
    circuit_breaker: _Any
    def __init__(self, func: _Callable[..., _Any], core: CircuitCore, breaker: _Any) -> None: ...
    # Called through the vectorcall slot, which the core sets at import (see the test).
    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any: ...
    def __get__(self, instance: object, owner: type | None = None, /) -> _Any: ...

# --- checkpoint (_core_checkpoint.pxi) -------------------------------------------------------
def siphash24_int64(key: bytes, value: int) -> int: ...

class ItemHasher:
    def __init__(self, key: bytes, hash_other: _Callable[[_Any], int | None]) -> None: ...
    def __call__(self, item: _Any) -> int | None: ...
    def pack(self, items: _Iterable[_Any]) -> tuple[bytes, int]: ...

# --- the serial fast path (_core_serial.pxi) ---------------------------------------------------
def serial_extend(
    func: _Callable[[_Any], _Any],
    it: _Any,
    values: list[_Any],
    start: int,
    on_failure: _Callable[[int, _Any, Exception], _Any],
) -> int: ...
@_final
class SerialMap:
    @property
    def count(self) -> int: ...
    def __init__(
        self,
        func: _Callable[[_Any], _Any],
        it: _Any,
        start: int,
        on_failure: _Callable[[int, _Any, Exception], _Any],
        pairs: bool = False,
    ) -> None: ...
    def __iter__(self) -> SerialMap: ...
    def __next__(self) -> _Any: ...
@_final
class SerialStream:
    def __init__(self, parts: _Any) -> None: ...
    def __iter__(self) -> SerialStream: ...
    def __next__(self) -> _Any: ...
    def close(self) -> None: ...
