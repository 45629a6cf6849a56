"""Builds the Cython extensions in pipellm/_ext and compiles the predictors' hot modules
(see PREDICTORS below). The CPU ones need only a C compiler and
Python headers; the CUDA driver layer (cudadriver) is built only where cuda-bindings'
.pxd files and the CUDA headers are present (a C++ compiler too), e.g.
``pip install -e '.[cuda]' && pip install -e . --no-build-isolation``."""
import importlib.util
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class ParallelBuildExt(build_ext):
    """Compiles the extensions on every core (``-j``) unless told otherwise."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1


def cuda_headers() -> str | None:
    """A folder holding cuda.h: $CUDA_HOME, the nvidia-cuda-runtime wheel, /usr/local/cuda."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(p, "include") for p in spec.submodule_search_locations]
    candidates.append("/usr/local/cuda/include")
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cuda.h"))), None)


def cuda_extension() -> list:
    """The cydriver layer, or nothing (with a line saying why) when its parts are missing."""
    bindings = importlib.util.find_spec("cuda.bindings") if importlib.util.find_spec("cuda") else None
    pxd = bindings is not None and any(os.path.exists(os.path.join(p, "cydriver.pxd"))
                                       for p in bindings.submodule_search_locations or ())
    headers = cuda_headers()
    if not pxd or headers is None:
        print(f"pipellm: not building the CUDA driver layer (cuda-bindings .pxd: {'found' if pxd else 'missing'}, "
              f"cuda.h: {headers or 'missing'})")
        return []
    extension = Extension("pipellm._ext.cudadriver", ["pipellm/_ext/cudadriver.pyx"], include_dirs=[headers],
                          language="c++", extra_compile_args=["-O2"], optional=True)  # a C++ failure skips it
    try:
        return cythonize([extension], **CYTHON)
    except Exception as exc:  # an incompatible cuda-bindings: the CPU build goes on without it
        print(f"pipellm: not building the CUDA driver layer: {exc!r}")
        return []


CYTHON = dict(language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})
extensions = [
    Extension(f"pipellm.{name.replace('/', '.')}", [f"pipellm/{name}.pyx"], extra_compile_args=["-O3"])
    # the low-level mechanisms (_ext), then each part's own hot path beside its Python
    for name in ("_ext/bounce", "_ext/driver", "_ext/fence", "_ext/gpupath", "_ext/intmap", "_ext/locks", "_ext/memcopy",
                 "_ext/sealpath", "_ext/writeguard", "channel/_message", "devices/_clock", "devices/_submission",
                 "pipeline/_region", "pipeline/_request", "pipeline/_sender", "pipeline/_speculation", "pipeline/_tasks")
]

# The predictors run on every transfer: their plain Python modules are also compiled (one
# source; the .py is what runs where no compiler is). Their hot classes carry Cython
# pure-Python-mode declarations (@cython.cclass, typed fields and locals), which the
# compiled modules turn into C: observe + predict costs about 0.6-0.75x of compiling them
# untyped (MoE); simple.py (`sequence`, the default) is compiled as written. Optional: a
# failure leaves the .py modules in use, which need no Cython at run time
# (predictors/_nocython.py stands in for the declarations).
PREDICTORS = [Extension(f"pipellm.predictors.{name}", [f"predictors/{name}.py"], extra_compile_args=["-O2"],
                        optional=True) for name in ("_layerwise", "_history", "rules", "learned", "simple")]

if __name__ == "__main__":  # (tests/test_cudadriver.py imports cuda_extension from here)
    setup(cmdclass={"build_ext": ParallelBuildExt}, ext_modules=cythonize(extensions, **CYTHON) + cythonize(
        PREDICTORS, language_level=3, compiler_directives={"annotation_typing": False}) + cuda_extension())
