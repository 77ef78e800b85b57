"""Build steps that pyproject.toml cannot express.

* The protobuf/gRPC modules are generated from ``proto/`` at build time into
  ``kvstore/v1/`` (never committed).
* The Cython extension ``kvstore._native`` is compiled from ``native/``.
  ``KVSTORE_DEBUG_BUILD=1`` builds it with Cython's bounds, wraparound and
  initialisation checks, C asserts (-UNDEBUG) and -O0 -g; switching between
  the two rebuilds the extension (a mode stamp in build/).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = sorted(PROTO_ROOT.glob("kvstore/v1/*.proto"))


def generate_protos() -> None:
    """Run protoc (from grpcio-tools) over proto/ into the package tree."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out = str(ROOT)
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    init = ROOT / "kvstore" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf modules (built from proto/, not committed)."""\n')


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


class DevelopWithProtos(develop):
    def run(self) -> None:
        generate_protos()
        super().run()


def native_mode_stamp(debug: bool) -> tuple[str, bool]:
    """build/native-mode, rewritten when the build mode changed, and whether
    it did. Cython regenerates its C only when a source is newer, and
    build_ext recompiles only when a source or dependency is: the switch
    did nothing after a release build (or kept the debug checks in the next
    release build) without it."""
    stamp = ROOT / "build" / "native-mode"
    mode = "debug" if debug else "release"
    try:
        changed = stamp.read_text().strip() != mode
    except OSError:
        changed = True
    if changed:
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(mode + "\n")
    return str(stamp.relative_to(ROOT)), changed


def native_extensions() -> list[Extension]:
    import numpy

    debug = os.environ.get("KVSTORE_DEBUG_BUILD") == "1"
    stamp, mode_changed = native_mode_stamp(debug)
    compile_args = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3"]
    extra_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native").glob("*.c")
                           if not p.name.startswith("_"))
    ext = Extension(
        "kvstore._native",
        sources=["native/_native.pyx", *extra_sources],
        include_dirs=[str(ROOT / "native"), numpy.get_include()],
        extra_compile_args=compile_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=[stamp],
    )
    from Cython.Build import cythonize

    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": not debug,
        "embedsignature": True,
    }
    return cythonize([ext], compiler_directives=directives, quiet=True, force=mode_changed)


setup(
    ext_modules=native_extensions(),
    cmdclass={"build_py": BuildPyWithProtos, "develop": DevelopWithProtos},
)
