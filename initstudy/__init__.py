"""initstudy: how weight initialisation changes training, of the seed document's LeNet (the
default model), of plain deep nets and of any model a user brings.

The names below load on first use, so that reading results (``initstudy.report``) does not
import torch.
"""

from ._version import __version__

_EXPORTS = {"RunConfig": "config", "LeNet": "model", "build_model": "model", "SCHEMES": "schemes",
            "apply_scheme": "schemes", "train": "training"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'initstudy' has no attribute '{name}'")
