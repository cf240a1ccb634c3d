"""Configuration mistakes as one line each: where the value came from (the YAML file or the
``--set`` argument), the key, what is wrong, and the nearest valid name ("did you mean")."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from medtl.registry import BACKBONES, RegistryError


def yaml_problem(err: Exception) -> str:
    """A YAML parse error in one line: the problem and where (line and column, counted from 1)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _section(model: type[BaseModel], loc: Sequence) -> type[BaseModel] | None:
    """The pydantic model at ``loc`` inside ``model`` (None when ``loc`` leads elsewhere)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, else the list of them."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; choose one of {', '.join(choices)}"


def source_of(key: str, overrides: Mapping[str, str], path: str | Path | None) -> str:
    """Where the value at dotted ``key`` came from: the ``--set`` argument that gave it (or a
    section above it), else the YAML file."""
    for given, raw in overrides.items():
        if key == given or key.startswith(given + ".") or given.startswith(key + "."):
            return f"--set {given}={raw}"
    return str(path) if path else "the defaults"


def validation_lines(err: ValidationError, model: type[BaseModel], overrides: Mapping[str, str],
                     path: str | Path | None) -> list[str]:
    """One line per bad key of a pydantic error, naming its source, with a "did you mean"."""
    lines = []
    for error in err.errors():
        loc = [str(p) for p in error["loc"]]
        key = ".".join(loc)
        where = source_of(key, overrides, path)
        if error["type"] == "extra_forbidden":
            section = _section(model, loc[:-1])
            known = list(section.model_fields) if section else []
            lines.append(f"{where}: unknown key '{key}'" + (did_you_mean(loc[-1], known) if known else ""))
            continue
        message = error["msg"].removeprefix("Value error, ")
        got = error.get("input")
        text = f"{where}: {key or 'config'}: {message}"
        if isinstance(error.get("ctx", {}).get("error"), RegistryError):
            text = f"{where}: {key}: {error['ctx']['error']}"
        elif error["type"] == "literal_error":
            options = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
            text = f"{where}: {key}: '{got}' is not allowed" + did_you_mean(str(got), options)
        elif not isinstance(got, (dict, list)) and error["type"] != "missing":
            text += f" (got {got!r})"
        lines.append(text)
    return lines


def backbone_line(config: Any, overrides: Mapping[str, str], path: str | Path | None) -> str | None:
    """The line for a ``model.backbone`` the registry lacks in ``data.spatial_dims``, or None;
    checked with the config so that no run folder is made for a model that cannot be built."""
    problem = BACKBONES.problem(config.model.backbone, config.data.spatial_dims)
    return f"{source_of('model.backbone', overrides, path)}: {problem}" if problem else None
