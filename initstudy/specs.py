"""Spec strings, as schemes and models are named on the command line and in study files:

- ``NAME`` or ``NAME:key=value,...`` for a built-in (``normal:std=0.01``, ``mlp:depth=30``);
- ``module.path:attr`` or ``path/to/file.py:attr`` for the user's own function or class.

Parsing a built-in's parameters and loading a user's attribute are written here once, for
both registries. No torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Param:
    """One parameter of a built-in: its default (``None``: required), a parser and what it
    accepts (for error messages)."""

    default: Any
    parse: Callable[[str], Any]
    accepts: str


def number(text: str) -> float:
    value = float(text)  # ValueError on junk: reported with the Param's `accepts`
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def integer(text: str) -> int:
    return int(text)


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text

    return parse


def parse_params(kind: str, name: str, params: dict[str, Param], text: str,
                 error: type[Exception]) -> dict[str, Any]:
    """The ``key=value,...`` of a spec, every parameter filled in with its default; ``error``
    (a message naming the ``kind`` and what is accepted) on an unknown key, a bad or missing
    value."""
    given: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in params:
            accepted = ", ".join(params) or "none"
            raise error(f"{kind} '{name}' has no parameter '{key}' (parameters: {accepted})")
        param = params[key]
        if not eq:
            raise error(f"parameter '{key}' of '{name}' needs a value: {key}=<{param.accepts}>")
        try:
            given[key] = param.parse(raw)
        except ValueError:
            raise error(f"bad value '{raw}' for '{key}' of {kind} '{name}': "
                        f"expected {param.accepts}") from None
    filled = {k: given.get(k, p.default) for k, p in params.items()}
    missing = [k for k, v in filled.items() if v is None]
    if missing:
        raise error(f"{kind} '{name}' needs {', '.join(missing)} (e.g. {name}:{missing[0]}=...)")
    return filled


def is_user_spec(rest: str) -> bool:
    """Whether the part after ``:`` names an attribute (a user's) rather than parameters."""
    return bool(rest) and "=" not in rest and rest.isidentifier()


def load_attr(target: str, attr: str, unknown: str, error: type[Exception]) -> Any:
    """``attr`` of a module path or a .py file; ``error`` when the file is missing, fails to
    load, or lacks ``attr``; ``unknown`` (the registry's message) when no module of that name
    can be imported."""
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise error(f"file not found: {target}")
        spec = importlib.util.spec_from_file_location(f"initstudy_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise error(f"cannot load {target}: {type(exc).__name__}: {exc}") from exc
    else:
        # Console scripts do not put the working directory on sys.path; a user's module
        # next to them is what `mymodule:attr` means.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise error(f"{unknown} (no importable module '{target}': "
                        f"{type(exc).__name__}: {exc})") from exc
    if not hasattr(module, attr):
        raise error(f"{target} has no '{attr}'")
    return getattr(module, attr)


def literal(text: str) -> Any:
    """A value as written for a user's class: an integer, a number, true/false, else text."""
    for parse in (int, number):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def literal_params(text: str, what: str, error: type[Exception]) -> dict[str, Any]:
    """``key=value,...`` for a user's class, each value a ``literal``."""
    params = {}
    for item in filter(None, text.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise error(f"bad parameter '{item}' for {what}: expected key=value")
        params[key.strip()] = literal(raw.strip())
    return params
