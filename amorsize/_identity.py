"""What identifies the function of a checkpointed run, so that a resumed run never mixes in
results computed by other code or with other values.

``function_identity(func)`` gives four header fields:

* ``func_module``, ``func_qualname``: where the function lives (wrappers that set
  ``__wrapped__`` — ``with_retry``, ``with_circuit_breaker``, ``functools.wraps`` — and
  ``functools.partial`` are looked through);
* ``func_code``: a digest of its bytecode, names and constants, nested functions included;
* ``func_values``: a digest of the **values the code uses**: default and keyword-only default
  arguments, closure cells (what a closure or lambda captured), the module-level globals its
  code names (module constants such as ``FACTOR = 2``), ``functools.partial`` arguments, a
  callable object's attributes, and, for functions of the same module that it uses (helpers,
  captured or referenced), their code and values in turn.

What is hashed: immutable plain data, that is ``None``, ``bool``, ``int``, ``float``,
``complex``, ``str``, ``bytes`` and tuples and frozensets of those (the first 100,000 values
in all); functions, by their identity. **What is not hashed, so a change in it is not
detected**: mutable containers (lists, dicts, sets, bytearrays: state that a run may change,
such as a counter or a cache, is not identity), other objects (class instances, arrays, data
frames, modules, classes), of all of which only the type's name counts (``partial``
arguments are the exception: hashed by their pickle, as before), values
past the 100,000th, functions of other modules (by name only: an upgraded library is not
seen), state the function reads when called (files, environment variables, attributes of
objects) and globals reached only through ``getattr`` or ``eval``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import pickle
from collections.abc import Callable, Iterator
from types import CodeType, FunctionType, MethodType
from typing import Any

__all__ = ["function_identity"]

_BUDGET = 100_000  # values hashed per identity: bounds the cost on huge constants
_MAX_DEPTH = 64
_SCALARS = (type(None), bool, int, float, complex)


def _code_digest(code: CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _code_digest(const, h)
        elif isinstance(const, frozenset):
            # Set literals: element order follows string hashing, which varies per process.
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())


def _names(code: CodeType) -> Iterator[str]:
    """The global (and attribute) names ``code`` and its nested code objects refer to."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _names(const)


class _Walk:
    """Feeds a function's code into one digest and the values it uses into another."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.code = hashlib.sha256()
        self.values = hashlib.sha256()
        self.seen: set[int] = set()
        self.budget = _BUDGET

    def _put(self, h: Any, tag: bytes, payload: bytes = b"") -> None:
        h.update(tag + len(payload).to_bytes(8, "little") + payload)

    def value(self, v: Any, h: Any, depth: int = 0, *, pickled: bool = False) -> None:
        """Feed ``v`` into ``h`` (see the module docstring for what is hashed)."""
        self.budget -= 1
        t = type(v)
        if self.budget < 0 or depth > _MAX_DEPTH:
            self._put(h, b"~", t.__qualname__.encode())
        elif t is int:
            self._put(h, b"i", hex(v).encode())  # hex: no digit limit for huge ints
        elif t in _SCALARS:
            self._put(h, b"s", f"{t.__name__}:{v!r}".encode())
        elif t is str:
            self._put(h, b"u", v.encode("utf-8", "surrogatepass"))
        elif t is bytes:
            self._put(h, b"b", v)
        elif t is tuple:
            self._put(h, b"(", str(len(v)).encode())
            for x in v:
                self.value(x, h, depth + 1, pickled=pickled)
        elif t is frozenset:
            self._unordered(v, h, depth, pickled)
        elif isinstance(v, (FunctionType, MethodType, functools.partial)):
            self.function(v, depth + 1)
            self._put(h, b"f", _name(v).encode())
        else:
            self._object(v, h, pickled)

    def _unordered(self, v: Any, h: Any, depth: int, pickled: bool) -> None:
        # A frozenset iterates in an order that may differ between processes: hash each
        # element alone and feed the digests sorted.
        parts = []
        for x in v:
            sub = hashlib.sha256()
            self.value(x, sub, depth + 1, pickled=pickled)
            parts.append(sub.digest())
        self._put(h, b"{", b"".join(sorted(parts)))

    def _object(self, v: Any, h: Any, pickled: bool) -> None:
        if pickled:
            try:
                self._put(h, b"p", pickle.dumps(v, 5))
                return
            except Exception:
                pass
        self._put(h, b"?", f"{type(v).__module__}.{type(v).__qualname__}".encode())

    def function(self, f: Any, depth: int = 0) -> None:
        """Feed a function's code and the values it uses (same module only; once each)."""
        if isinstance(f, functools.partial):
            self.value((f.args, f.keywords), self.values, depth + 1, pickled=True)
            self.function(inspect.unwrap(f.func), depth + 1)
            return
        if isinstance(f, MethodType):
            self._object(f.__self__, self.values, False)
            f = f.__func__
        if id(f) in self.seen or depth > _MAX_DEPTH:
            return
        self.seen.add(id(f))
        code = getattr(f, "__code__", None)
        if not isinstance(code, CodeType):
            # A callable object: its class's __call__ holds the code, its attributes the values.
            call = type(f).__dict__.get("__call__")
            if isinstance(call, FunctionType):
                self.function(call, depth + 1)
                attrs = getattr(f, "__dict__", {})
                self.value(tuple(sorted(attrs.items(), key=lambda kv: str(kv[0]))), self.values, depth + 1)
            return
        if depth and getattr(f, "__module__", None) != self.module:
            return  # another module's function: its name was fed by the caller
        _code_digest(code, self.code)
        self._function_values(f, code, depth)

    def _function_values(self, f: Any, code: CodeType, depth: int) -> None:
        h = self.values
        self.value(getattr(f, "__defaults__", None), h, depth + 1)
        kwdefaults = getattr(f, "__kwdefaults__", None) or {}
        self.value(tuple(sorted(kwdefaults.items())), h, depth + 1)
        for name, cell in zip(code.co_freevars, getattr(f, "__closure__", None) or (), strict=False):
            self._put(h, b"c", name.encode())
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name bound later in the outer function)
                continue
            self.value(content, h, depth + 1)
        namespace = getattr(f, "__globals__", None) or {}
        for name in sorted(set(_names(code))):
            if name in namespace:
                self._put(h, b"g", name.encode())
                self.value(namespace[name], h, depth + 1)


def _name(f: Any) -> str:
    target = f.func if isinstance(f, functools.partial) else f
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def function_identity(func: Callable[..., Any]) -> dict[str, str]:
    """The module, qualified name, code digest and values digest of ``func`` (see above).

    >>> function_identity(len)["func_qualname"]
    'len'
    """
    f: Any = inspect.unwrap(func)
    root = f
    while isinstance(root, functools.partial):
        root = inspect.unwrap(root.func)
    module = str(getattr(root, "__module__", None) or type(root).__module__)
    qualname = str(getattr(root, "__qualname__", None) or type(root).__qualname__)
    walk = _Walk(module)
    walk.function(f)
    return {
        "func_module": module,
        "func_qualname": qualname,
        "func_code": walk.code.hexdigest()[:16],
        "func_values": walk.values.hexdigest()[:16],
    }
