"""Builds the Cython extension in pipellm/_ext (needs only a C compiler and Python headers)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(f"pipellm._ext.{name}", [f"pipellm/_ext/{name}.pyx"], extra_compile_args=["-O3"])
    for name in ("bounce", "memcopy", "writeguard")
]

setup(ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}))
