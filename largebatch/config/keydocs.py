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

from largebatch.config.schema import OPTIMIZERS, Config, OptimConfig


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference and ``--help-config`` describe it."""

    key: str
    """The dotted key, e.g. ``optim.base_lr``."""
    default: Any
    """Its value in a run with no config file and no overrides."""
    doc: str
    """The field's docstring, on one line."""
    resolved: str = ""
    """For a null default that the run resolves from other keys: what it becomes, e.g.
    ``per optimizer, at base_batch 256: sgd 0.2, lars/larc 0.9375, lamb 0.0035355``; '' otherwise."""


def _docstrings() -> dict[str, str]:
    """``{"<ClassName>.<field>": docstring}`` for every documented field of the schema's module."""
    docs: dict[str, str] = {}
    for node in ast.parse(inspect.getsource(inspect.getmodule(Config))).body:
        if isinstance(node, ast.ClassDef):
            for a, b in zip(node.body, node.body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[f"{node.name}.{a.target.id}"] = " ".join(str(b.value.value).split())
    return docs


def _declared(f: dataclasses.Field) -> Any:
    """The default a field is declared with, before ``__post_init__`` resolves anything."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _per_optimizer(name: str) -> str:
    """What optim.<name> resolves to for each optimizer, e.g. ``sgd 0.2, lars/larc 0.9375, lamb 0.0035355``."""
    values: dict[Any, list[str]] = {}
    for optimizer in OPTIMIZERS:
        values.setdefault(getattr(OptimConfig(name=optimizer), name), []).append(optimizer)
    return ", ".join(f"{'/'.join(names)} {value:.5g}" if isinstance(value, float) else f"{'/'.join(names)} {value}"
                     for value, names in values.items())


def _resolved(section: str, f: dataclasses.Field, default: Any, resolved: Any) -> str:
    """KeyDoc.resolved for one key: '' unless its declared default is null and the run fills it in."""
    if default is not None or resolved is None:
        return ""
    if section != "optim":
        return f"resolved: {resolved!r}"
    batch = f", at base_batch {OptimConfig().base_batch}" if f.name == "base_lr" else ""
    return f"per optimizer{batch}: {_per_optimizer(f.name)}"


def key_docs() -> list[KeyDoc]:
    """Every config key in schema order, with its declared default, its docstring ('' where it has none)
    and, for a null default resolved from other keys (optim.base_lr, optim.scaling), what it becomes."""
    docs, resolved = _docstrings(), dataclasses.asdict(Config())
    sections = typing.get_type_hints(Config)
    return [KeyDoc(f"{s.name}.{f.name}", _declared(f), docs.get(f"{sections[s.name].__name__}.{f.name}", ""),
                   _resolved(s.name, f, _declared(f), resolved[s.name][f.name]))
            for s in dataclasses.fields(Config) for f in dataclasses.fields(sections[s.name])]
