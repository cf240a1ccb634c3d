"""The run facts a report's checklist shows, built in one place for the training and the
evaluation report, from the run configuration and the bundle's own record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medtl.bundle import package_versions
from medtl.config import Config


def transfer_method(config: Config, target_scans: int) -> str:
    """The fine-tuning strategy, with the domain adaptation and its unlabelled target scans."""
    adapt = config.adapt
    if adapt.domain == "none":
        return adapt.strategy
    return f"{adapt.strategy} + {adapt.domain} ({target_scans} unlabelled target scans)"


def run_info(config: Config, meta: Mapping[str, Any], *, title: str, evaluated_on: str, recalibration: str,
             **extra: Any) -> dict[str, Any]:
    """The ``info`` of a report on the bundle described by ``meta`` (its ``bundle.json``),
    trained with ``config``; ``extra`` adds report-specific facts (model selection, exclusions)."""
    training = dict(meta.get("training") or {})
    model = meta["model"]
    return {
        "title": title,
        "evaluated_on": evaluated_on,
        "software": package_versions(),
        "bundle_versions": meta.get("versions"),
        "seed": config.train.seed,
        "backbone": model["backbone"],
        "initial_weights": model.get("weights"),
        "transfer_method": transfer_method(config, training.get("adaptation", {}).get("target_scans", 0)),
        "training": training,
        "hyperparameters": config.train.model_dump(mode="json"),
        "preprocessing": meta["preprocessing"],
        "recalibration": recalibration,
        "operating_point": meta.get("operating_point") or "argmax (multi-class)",
        **extra,
    }
