"""State that every worker process of a run updates: int64 slots in named shared memory.

A ``RetryBudget`` or ``RateLimiter`` keeps its slots (see ``_core_budget.pxi``) in this
process's memory until it has to cross a process boundary; then its slots move, with their
values, into a named shared-memory segment, and pickling sends only the segment's name and
the parameters. A worker unpickling it maps the same segment (once per process: every
unpickled copy of one object is the same object there), so all of them update one set of
counters with C atomics, and no message goes to the parent per call::

    parent                                          worker process
    ------                                          --------------
    execute(...): obj._share()  -> segment "psm_ab12" (slots copied in)
    pickle(obj) -> ("psm_ab12", params)  ───────▶  attach("psm_ab12"): mmap, no copy
    calls: CAS on the segment's slots    ◀──────▶  calls: CAS on the same slots
    end of run: obj._unshare() -> slots copied back, segment unlinked

Why shared memory and not a broker in the parent: an acquire or deposit is one
compare-and-swap, ~80 ns per acquire with two processes acquiring at once, against ~20 µs
for a round trip to a broker thread in the parent (``benchmarks/bench_budget.py``, 2 cores
under load), and it keeps working while the parent is busy.

Clean-up: a run unlinks the segment it shared when it ends, Ctrl-C included; a segment shared
by pickling outside a run lives until ``close()``, the object's collection or the
interpreter's exit. The segment is created through ``multiprocessing.shared_memory``, whose
resource tracker unlinks it if the parent is killed (SIGKILL). Workers map it without
registering it with that tracker, so that a worker's exit never unlinks the parent's segment.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import mmap
import os
import sys
import threading
import weakref
from typing import Any

__all__ = ["Shareable", "attach"]

# Segment name -> the object of this process that maps it (an unpickled copy, or the owner).
_ATTACHED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
# Objects whose segment this process created: released at exit (see _release_all).
_OWNED: weakref.WeakSet[Any] = weakref.WeakSet()
_LOCK = threading.RLock()


class Shareable:
    """Mixin for the ``_SlotsCore`` subclasses: where their slots live, and how they travel.

    The subclass calls ``_local_slots()`` from ``__init__`` and defines ``_params()``,
    the keyword arguments that rebuild it.
    """

    _n_bytes: int
    _segment: Any  # the SharedMemory this process created, or the mmap it attached
    _name: str | None
    _shares: int  # runs using the segment now, plus one if pickling shared it for good
    _finalizer: weakref.finalize[Any, Any] | None

    def _use_buffer(self, buf: Any, copy: bool) -> None:  # the compiled base class's
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def _local_slots(self, n_bytes: int) -> None:
        """Start with zeroed slots in this process's memory."""
        self._n_bytes = n_bytes
        self._segment = None
        self._name = None
        self._shares = 0
        self._finalizer = None
        self._use_buffer(bytearray(n_bytes), False)

    @property
    def shared_name(self) -> str | None:
        """The shared-memory segment holding the state, or ``None`` while it is private."""
        return self._name

    def _share(self) -> str:
        """Move the slots into a named segment (once) and count one more user of it."""
        with _LOCK:
            if self._name is None:
                from multiprocessing import shared_memory

                shm = shared_memory.SharedMemory(create=True, size=self._n_bytes)
                self._use_buffer(shm.buf, True)
                self._segment, self._name = shm, shm.name
                _ATTACHED[shm.name] = self
                _OWNED.add(self)
                # Collected while shared: unlink then. At exit _release_all does it instead,
                # while the object still exists (its slots still map the segment then).
                self._finalizer = weakref.finalize(self, _unlink, shm, os.getpid())
                self._finalizer.atexit = False
            self._shares += 1
            return self._name

    def _unshare(self) -> None:
        """One user fewer; the last one moves the slots back and unlinks the segment."""
        with _LOCK:
            self._shares -= 1
            if self._shares <= 0:
                self._shares = 0
                self._to_local()

    def _to_local(self) -> None:
        segment, name, finalizer = self._segment, self._name, self._finalizer
        if name is None:
            return
        self._use_buffer(bytearray(self._n_bytes), True)
        self._segment = self._name = self._finalizer = None
        if _ATTACHED.get(name) is self:
            del _ATTACHED[name]
        _OWNED.discard(self)
        detached = None if finalizer is None else finalizer.detach()
        if detached is not None:  # not finalizer(): at exit, finalize refuses to run it
            _, func, args, _ = detached
            func(*args)  # closes and unlinks the segment this process created
        elif isinstance(segment, mmap.mmap):
            segment.close()

    def close(self) -> None:
        """Release the shared-memory segment now (the state goes on, private to this process).

        Needed only for an object that was pickled outside ``execute`` (which releases what
        it shared when the run ends); collection and interpreter exit release it too.
        """
        with _LOCK:
            self._shares = 0
            self._to_local()

    def __reduce__(self) -> tuple[Any, ...]:
        with _LOCK:
            if self._name is None:
                self._share()  # pickled outside a run: shared until close() or exit
            return (attach, (type(self), self._name, self._params()))


@atexit.register
def _release_all() -> None:
    """Unlink every segment this process created and still shares (not in forked children)."""
    for obj in list(_OWNED):
        obj.close()


def _unlink(shm: Any, owner: int) -> None:
    # A forked child inherits this finalizer: only the creating process unlinks.
    if os.getpid() != owner:
        return
    shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


def attach(cls: type[Shareable], name: str, params: dict[str, Any]) -> Shareable:
    """The object of this process mapping segment ``name``, built from ``params`` once."""
    with _LOCK:
        obj = _ATTACHED.get(name)
        if obj is None:
            obj = cls(**params)
            segment = _map(name, obj._n_bytes, cls.__name__)
            obj._use_buffer(segment, False)
            obj._segment, obj._name, obj._shares = segment, name, 1
            _ATTACHED[name] = obj
        return obj


def _map(name: str, n_bytes: int, what: str) -> mmap.mmap:
    """Map an existing segment without registering it with the resource tracker."""
    if sys.platform == "win32":
        return mmap.mmap(-1, n_bytes, tagname=name)
    # What multiprocessing.shared_memory uses underneath (a C module without type stubs).
    posixshmem = importlib.import_module("_posixshmem")
    try:
        fd = posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        msg = (
            f"the shared state of a {what} (shared-memory segment {name!r}) is gone: the "
            f"process that shared it ended its run, closed it or exited; pickle the {what} "
            f"again from a live process"
        )
        raise RuntimeError(msg) from None
    try:
        return mmap.mmap(fd, n_bytes)
    finally:
        os.close(fd)
