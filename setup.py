"""Build steps that pyproject.toml cannot express on its own.

1. Generate the protobuf code for ``proto/sovereign/v1/*.proto`` into
   ``src/sovereign/v1`` (``*_pb2.py`` + ``.pyi``). This runs on every setup.py
   invocation (wheel, sdist, editable) so no manual step is ever needed.
2. Compile the Cython hot path in ``src/sovereign/_fast``. Every ``.pyx`` there is
   an extension; each has a pure-Python twin elsewhere in the package.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    from grpc_tools import protoc  # build requirement (pyproject [build-system])

    proto_root = os.path.join(HERE, "proto")
    out = os.path.join(HERE, "src")
    files = sorted(glob.glob(os.path.join(proto_root, "sovereign", "v1", "*.proto")))
    for path in files:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                path,
            ]
        )
        if rc != 0:
            sys.exit(f"protoc failed on {path} (exit {rc})")


def fast_extensions() -> list[Extension]:
    from Cython.Build import cythonize

    sources = sorted(glob.glob(os.path.join("src", "sovereign", "_fast", "*.pyx")))
    exts = [
        Extension(
            "sovereign._fast." + os.path.splitext(os.path.basename(src))[0],
            [src],
            extra_compile_args=["-O3"],
        )
        for src in sources
    ]
    return cythonize(
        exts,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        quiet=True,
    )


generate_protos()
setup(ext_modules=fast_extensions())
