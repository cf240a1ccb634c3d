"""The tensor-by-tensor transfer of pretrained weights into a backbone, and its load report.

Every source is turned into a state dict in the backbone's own key names (:mod:`.sources`);
:func:`transfer` then matches it against the backbone tensor by tensor, adapts what can be adapted exactly (the
stem's input channels, 2D -> 3D inflation) and reports every other difference.  Nothing is
skipped silently: a missing, unexpected or shape-mismatched tensor is an error unless the caller
allows mismatches, and even then it is in the report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from medtl.backbones.adapt import adapt_input_channels, inflate_to_3d
from medtl.backbones.registry import BackboneSpec
from medtl.backbones.sources import SourceWeights

log = logging.getLogger("medtl.backbones")

class WeightsMismatchError(ValueError):
    """Weights that do not fit the backbone; the message carries the load report."""


@dataclass
class LoadReport:
    """What happened to every tensor when pretrained weights were loaded.

    ``loaded``: copied unchanged.  ``adapted``: copied through an exact adaptation (key -> how).
    ``missing``: backbone tensors the weights lack (left at random initialisation).
    ``unexpected``: tensors in the weights with no place in the backbone.  ``mismatched``: same
    key, incompatible shape (key -> shapes).  ``dropped``: the source's own classifier, replaced
    by the medtl head.
    """

    source: str
    file: str | None = None
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone tensor was loaded or adapted and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        """Counts on one line, then every adaptation and (up to ``limit`` of) each problem."""
        if self.source == "none":
            return "weights none: random initialisation"
        where = f" ({self.file})" if self.file else ""
        lines = [
            f"weights {self.source}{where}: {len(self.loaded)} loaded, {len(self.adapted)} adapted, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched, {len(self.dropped)} dropped (source classifier)"
        ]
        sections = (
            ("adapted", [f"{key}: {how}" for key, how in self.adapted.items()]),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape-mismatched", [f"{key}: {shapes}" for key, shapes in self.mismatched.items()]),
        )
        for label, items in sections:
            lines += [f"  {label} {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more {label}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for run reports and bundles."""
        return asdict(self)


# ---------------------------------------------------------------- transfer


def transfer(
    backbone: nn.Module,
    found: SourceWeights,
    spec: BackboneSpec,
    *,
    source: str,
    allow_mismatch: bool = False,
    inflation: str = "mean",
) -> LoadReport:
    """Load ``found`` into ``backbone`` tensor by tensor and report on every one.

    Exact adaptations: the stem kernel to another channel count (:func:`adapt_input_channels`)
    and any 2D kernel into its 3D twin (:func:`inflate_to_3d`), besides the source's own
    conversions.  BatchNorm step counters (``num_batches_tracked``) are bookkeeping, not learned,
    and old checkpoints lack them; they are not reported missing.  Raises
    :class:`WeightsMismatchError` unless the report is clean or ``allow_mismatch``.
    """
    state = found.state
    report = LoadReport(source=source, file=found.file, dropped=list(found.dropped))
    target = backbone.state_dict()
    accepted = {}
    stem_weight = spec.stem + ".weight"
    for key, want in target.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
            continue
        tensor, notes = state[key], [found.adapted[key]] if key in found.adapted else []
        if tensor.dim() == 4 and want.dim() == 5 and tensor.shape[0] == want.shape[0] and tensor.shape[2:] == want.shape[3:]:
            tensor = inflate_to_3d(tensor, want.shape[2], inflation)
            notes.append(f"2D -> 3D ({inflation} over depth {want.shape[2]})")
        if key == stem_weight and tensor.dim() == want.dim() and tensor.shape[1] != want.shape[1] and tensor.shape[2:] == want.shape[2:]:
            rule = "summed" if want.shape[1] == 1 else f"tiled, x{tensor.shape[1]}/{want.shape[1]}"
            notes.append(f"{tensor.shape[1]} -> {want.shape[1]} input channels ({rule})")
            tensor = adapt_input_channels(tensor, want.shape[1])
        if tensor.shape != want.shape:
            report.mismatched[key] = f"weights {tuple(state[key].shape)} vs model {tuple(want.shape)}"
            continue
        accepted[key] = tensor
        if notes:
            report.adapted[key] = "; ".join(notes)
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in target]
    if not report.ok and not allow_mismatch:
        raise WeightsMismatchError(
            f"{source} weights do not fit {spec.name} ({spec.dims}D); to load them anyway pass "
            f"allow_mismatch=True (config: model.allow_mismatch: true):\n{report.summary()}"
        )
    backbone.load_state_dict(accepted, strict=False)
    log.info("%s", report.summary())
    if not report.ok:
        log.warning("%s weights loaded with mismatches (allowed): %d missing tensors stay random", source, len(report.missing))
    return report
