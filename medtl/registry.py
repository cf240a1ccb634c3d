"""The registries: the one list of every name a config can choose.

Each stage package fills its registry with a decorator where the thing is defined
(``@register_calibrator``, ``@register_strategy``, ``@register_domain_loss``,
``@register_normalization``, ``@register_score``, ``@register_task``, ``register_backbone(..., builder=)``), so adding
a method is one file.  A registry imports its package on first lookup: :mod:`medtl.config`
validates names against the registries without importing any stage (nor torch) itself.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError, ValueError):
    """A name a registry does not hold (a ``KeyError`` for lookups, a ``ValueError`` for bad
    input; printed as the plain message)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Mapping[str, T], Generic[T]):
    """Names -> entries of one kind, filled by :meth:`register` in ``package``."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._entries: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)
        return self._entries

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: file the decorated object under ``name`` (a name already taken is an error)."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in or a test that registered it)."""
        self._entries.pop(name, None)

    def unknown(self, name: object, choices: list[str] | None = None, kind: str | None = None) -> str:
        """The one-line message for a name that is not registered: the closest name, and the list
        (``choices``: default the registered names)."""
        choices = list(self) if choices is None else choices
        close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {kind or self.kind} '{name}'{hint} (registered: {', '.join(choices)})"

    def __getitem__(self, name: str) -> T:
        entries = self._load()
        if not isinstance(name, str) or name not in entries:
            raise RegistryError(self.unknown(name))
        return entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


class BackboneRegistry(Registry[dict]):
    """Backbone names -> ``{spatial_dims: BackboneSpec}``: one name may be built in 2D and 3D."""

    def add(self, spec: Any) -> None:
        """File ``spec`` (a ``BackboneSpec``) under its name and dimensionality."""
        builds = self._entries.setdefault(spec.name, {})
        if spec.dims in builds:
            raise ValueError(f"backbone '{spec.name}' is already registered in {spec.dims}D")
        builds[spec.dims] = spec

    def unregister(self, name: str, spatial_dims: int | None = None) -> None:
        """Remove ``name`` (only its ``spatial_dims`` build when given)."""
        builds = self._entries.get(name, {})
        if spatial_dims is not None and len(builds) > 1:
            builds.pop(spatial_dims, None)
        else:
            self._entries.pop(name, None)

    def problem(self, name: str, spatial_dims: int | None = None) -> str | None:
        """Why ``name`` cannot be built in ``spatial_dims`` (None when it can)."""
        if name not in self:
            known = sorted(n for n, builds in self.items() if spatial_dims in (None, *builds))
            where = f" in {spatial_dims}D" if spatial_dims else ""
            return self.unknown(name, known).replace("(registered:", f"(registered{where}:")
        builds = self[name]
        if spatial_dims is not None and spatial_dims not in builds:
            return f"backbone '{name}' is not built in {spatial_dims}D (only {sorted(builds)}D)"
        return None


CALIBRATORS: Registry = Registry("calibration method", "medtl.calibrate")
LOCAL_UPDATES: Registry = Registry("local calibration update", "medtl.calibrate")
STRATEGIES: Registry = Registry("fine-tuning strategy", "medtl.adapt")
DOMAIN_LOSSES: Registry = Registry("domain loss", "medtl.adapt")
NORMALIZATION: Registry = Registry("normalisation adaptation", "medtl.adapt")
SCORES: Registry = Registry("selection score", "medtl.adapt")
TASKS: Registry = Registry("task type", "medtl.tasks")
BACKBONES = BackboneRegistry("backbone", "medtl.backbones")
