"""The config keys as documented in the schema: each key's default and field docstring.

``python -m largebatch.train --help-config`` prints them, and ``python -m largebatch.config.reference``
writes them into docs/configuration.md, so the docstrings in :mod:`largebatch.config.schema` are
their only source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any

from largebatch.config.schema import Config


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference and ``--help-config`` describe it."""

    key: str
    """The dotted key, e.g. ``optim.base_lr``."""
    default: Any
    """Its value in a run with no config file and no overrides."""
    doc: str
    """The field's docstring, on one line."""


def _docstrings() -> dict[str, str]:
    """``{"<ClassName>.<field>": docstring}`` for every documented field of the schema's module."""
    docs: dict[str, str] = {}
    for node in ast.parse(inspect.getsource(inspect.getmodule(Config))).body:
        if isinstance(node, ast.ClassDef):
            for a, b in zip(node.body, node.body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[f"{node.name}.{a.target.id}"] = " ".join(str(b.value.value).split())
    return docs


def key_docs() -> list[KeyDoc]:
    """Every config key in schema order, with its default and its docstring ('' where it has none)."""
    docs, defaults = _docstrings(), dataclasses.asdict(Config())
    sections = typing.get_type_hints(Config)
    return [KeyDoc(f"{s.name}.{f.name}", defaults[s.name][f.name],
                   docs.get(f"{sections[s.name].__name__}.{f.name}", ""))
            for s in dataclasses.fields(Config) for f in dataclasses.fields(sections[s.name])]
