"""Declares the compiled core; all metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("amorsize._core", ["amorsize/_core.pyx"])],
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            # The core indexes only C arrays it sized itself, so these checks buy nothing.
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
