"""The run facts a report's checklist shows: :class:`RunInfo`, built once per job from the run
configuration and the bundle's own record, by the training and the evaluation report alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medtl.bundle import package_versions
from medtl.config import Config


def transfer_method(config: Config, target_scans: int) -> str:
    """The fine-tuning strategy, with the domain adaptation and its unlabelled target scans."""
    adapt = config.adapt
    if adapt.domain == "none":
        return adapt.strategy
    return f"{adapt.strategy} + {adapt.domain} ({target_scans} unlabelled target scans)"


@dataclass(frozen=True)
class RunInfo:
    """The run behind a bundle: its configuration and what its ``bundle.json`` records.  ``train``
    builds it from the bundle it has just written and ``evaluate`` from the bundle it loads, so the
    two reports state a run the same way."""

    config: Config
    backbone: str
    initial_weights: str | None
    classes: list[str]
    positive_index: int | None
    preprocessing: Mapping[str, Any]
    training: Mapping[str, Any]
    calibration: str | None
    operating_point: Mapping[str, Any] | None
    versions: Mapping[str, Any] | None

    @classmethod
    def of(cls, config: Config, meta: Mapping[str, Any]) -> RunInfo:
        """The run trained with ``config`` that wrote ``meta`` (a bundle's ``bundle.json``)."""
        model = meta["model"]
        return cls(config=config, backbone=model["backbone"], initial_weights=model.get("weights"), classes=list(meta["classes"]),
                   positive_index=meta.get("positive_index"), preprocessing=meta["preprocessing"],
                   training=dict(meta.get("training") or {}), calibration=meta["calibration"].get("method"),
                   operating_point=meta.get("operating_point"), versions=meta.get("versions"))

    def report(self, *, title: str, evaluated_on: str, recalibration: str, **extra: Any) -> dict[str, Any]:
        """A report's ``info``: these facts with the report's own (title, data, recalibration;
        ``extra``: model selection, exclusions)."""
        config = self.config
        return {
            "title": title,
            "evaluated_on": evaluated_on,
            "software": package_versions(),
            "bundle_versions": self.versions,
            "seed": config.train.seed,
            "backbone": self.backbone,
            "initial_weights": self.initial_weights,
            "transfer_method": transfer_method(config, self.training.get("adaptation", {}).get("target_scans", 0)),
            "training": dict(self.training),
            "hyperparameters": config.train.model_dump(mode="json"),
            "preprocessing": self.preprocessing,
            "recalibration": recalibration,
            "operating_point": self.operating_point or "argmax (multi-class)",
            **extra,
        }
