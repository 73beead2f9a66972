"""Typed TOML files (a model's ``config.toml``, a remote variant's ``remote.toml``) read
through one function, so that every mistake is reported the same way: the file, the field,
and what to do about it."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class TomlError(ValueError):
    """A TOML file that cannot be used; the message names the file and the field."""


def load_toml(
    path: Path,
    model: type[M],
    *,
    unknown_hint: str | None = None,
    examples: Mapping[str, str] | None = None,
) -> M:
    """Read ``path`` as ``model``. ``unknown_hint`` follows "unknown field" (default: the
    fields ``model`` has); ``examples`` give a value to suggest for a missing field.
    Raises TomlError."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TomlError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise TomlError(f"{path}: cannot be read: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        hint = unknown_hint or f"the fields are {', '.join(model.model_fields)}"
        details = "; ".join(_describe(err, hint, examples or {}) for err in e.errors())
        raise TomlError(f"{path}: {details}") from None


def _describe(err: Any, unknown_hint: str, examples: Mapping[str, str]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"field '{loc}': unknown field; {unknown_hint}"
    if err["type"] == "missing" and loc in examples:
        return f"field '{loc}': missing; add it, e.g. {loc} = {examples[loc]}"
    return f"field '{loc}': {err['msg']}"
