"""amorsize: decide whether and how to parallelise ``map(func, data)``, run it, survive failure.

This module only re-exports the public API; each concept lives in its own module.
"""

from amorsize._version import __version__

__all__ = [
    "__version__",
]
