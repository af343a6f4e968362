"""Generates the gRPC stubs from proto/ whenever the package is built or installed (editable too)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement (pyproject.toml)

    proto_root = ROOT / "proto"
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(sources))


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


if __name__ == "__main__":  # importable, so scripts/gpu-check can generate the stubs without installing
    setup(cmdclass={"build_py": BuildWithStubs})
