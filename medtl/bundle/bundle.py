"""A bundle is a self-contained folder holding everything needed to run a trained model.

    bundle/
      model.safetensors   weights of the whole classifier (``backbone.*``, ``head.*``; an ensemble's
                          ``members.<k>.backbone.*``, ``members.<k>.head.*``)
      bundle.json         model spec, task, classes, preprocessing recipe, calibrator, operating point,
                          package versions, training summary
      config.yaml         the resolved run configuration
      reference.safetensors  training-feature reference for shift alarms (optional; reference.py)

Nothing is pickled: weights are safetensors and everything else is JSON/YAML, so a bundle from
anyone can be loaded safely.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medtl.backbones import Ensemble, create
from medtl.bundle.api import ScanAPI, check_preprocessed
from medtl.bundle.reference import FeatureReference, read_reference
from medtl.bundle.runtime import CompiledOrEager, amp_dtype, uses_channels_last
from medtl.bundle_format import CONFIG_FILE, FORMAT, META_FILE, WEIGHTS_FILE, BundleError, read_meta
from medtl.tasks import Task, task_from_meta
from medtl.train.trainer import resolve_device
from medtl.transforms import build_transforms

_VERSIONED = ("medtl", "torch", "torchvision", "monai", "pydicom", "nibabel", "numpy", "scikit-learn", "scipy")


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape a model's numbers."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save(
    path: str | Path,
    model: torch.nn.Module,
    *,
    model_spec: Mapping[str, Any],
    classes: list[str],
    positive_index: int | None,
    preprocessing: Mapping[str, Any],
    calibrator,
    operating_point: Any,
    task: Task | None = None,
    config_yaml: str = "",
    training: Mapping[str, Any] | None = None,
    reference: FeatureReference | None = None,
) -> Path:
    """Write a bundle folder (with ``reference.safetensors`` when ``reference`` is given); returns its path.
    ``operating_point``: the task's decision rule (:meth:`~medtl.tasks.Task.choose_decision`);
    ``task`` default: binary with a ``positive_index``, else multi-class."""
    path = Path(path)
    task = task if task is not None else task_from_meta({"classes": classes, "positive_index": positive_index})
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    meta = {
        "format": FORMAT,
        "model": dict(model_spec),
        "task": task.to_dict(),
        "classes": list(classes),
        "positive_index": positive_index,
        "preprocessing": dict(preprocessing),
        "calibration": calibrator.to_dict(),
        "operating_point": task.decision_to_dict(operating_point),
        "versions": package_versions(),
        "training": dict(training or {}),
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    (path / CONFIG_FILE).write_text(config_yaml)
    if reference is not None:
        reference.save(path)
    return path


class Predictor(ScanAPI):
    """A loaded bundle: preprocessing, model, calibration and decision rule in one object.

    >>> predictor = medtl.bundle.load("runs/demo/bundle", device="auto")
    >>> probs = predictor.predict_proba(["scan1.dcm", "scan2.nii.gz"])
    >>> names = predictor.predict("scan1.dcm")
    >>> probs = predictor.predict_array(dicom.pixel_array, spacing=(0.14, 0.14))
    """

    def __init__(self, model: torch.nn.Module, meta: Mapping[str, Any], device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.meta = dict(meta)
        self.device = device
        self.task = task_from_meta(meta)
        self.classes: list[str] = list(meta["classes"])
        self.positive_index: int | None = meta.get("positive_index")
        self.preprocessing: dict[str, Any] = dict(meta["preprocessing"])
        self.calibrator = self.task.load_calibrator(meta["calibration"])
        self.operating_point = self.task.load_decision(meta.get("operating_point"))
        self.channels_last = False
        self.amp_dtype: torch.dtype | None = None
        self._forward: torch.nn.Module = self.model
        self.reference: FeatureReference | None = None  # set by load() from reference.safetensors

    def accelerate(self, *, channels_last: bool = True, amp: bool = False, compile: bool = False) -> Predictor:
        """Tune the forward pass for throughput: channels-last memory where the network gains
        from it, autocast to bfloat16/float16 on GPUs (``amp``), ``torch.compile`` with an eager
        fallback (``compile``).  Returns ``self``."""
        self.channels_last = channels_last and uses_channels_last(self.model, self.preprocessing["spatial_dims"])
        self.model = self.model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.amp_dtype = amp_dtype(self.device, amp)
        self._forward = CompiledOrEager(self.model) if compile else self.model
        return self

    def transforms(self):
        """The evaluation-time MONAI transform chain for one item ``{"image": path}``."""
        return build_transforms(self.preprocessing, train=False)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> np.ndarray:
        """Raw logits for a batch the bundle's preprocessing made, ``(B, C, *image_size)``
        (raw images go through :meth:`predict_array`; this refuses them)."""
        check_preprocessed(images, self.preprocessing)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self._forward(images).float().cpu().numpy()

    @property
    def n_members(self) -> int:
        """How many models vote: an ensemble bundle's members, else 1."""
        return len(self.model.members) if isinstance(self.model, Ensemble) else 1

    @torch.inference_mode()
    def member_logits(self, images: torch.Tensor) -> np.ndarray:
        """Each member's raw logits ``(members, B, C)`` for a preprocessed batch; a single model
        is one member.  :func:`~medtl.backbones.pool_members` pools them into :meth:`logits`."""
        if not isinstance(self.model, Ensemble):
            return self.logits(images)[None]
        check_preprocessed(images, self.preprocessing)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.model.member_logits(images).float().cpu().numpy()

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` from logits: per class, or per finding (multi-label)."""
        return self.calibrator.transform(np.asarray(logits, dtype=np.float64))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Decisions at the stored rule (:meth:`medtl.tasks.Task.decide`): class indices (the
        operating point on the positive-class probability for binary models, argmax otherwise), or
        0/1 per finding for multi-label models."""
        return self.task.decide(probs, self.operating_point)


def load(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load a bundle folder into a ready :class:`Predictor` on ``device`` (``"auto"``: this
    process's GPU when there is one, else the CPU)."""
    path = Path(path)
    meta = read_meta(path)
    spec = meta["model"]
    members = [
        create(spec["backbone"], weights="none", in_channels=spec["in_channels"], spatial_dims=spec["spatial_dims"],
               num_classes=spec["num_classes"])
        for _ in range(spec.get("members", 1))
    ]
    model = Ensemble(members, combine=spec.get("combine", "prob_mean")) if spec.get("members") else members[0]
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{path}: {WEIGHTS_FILE} not found")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise BundleError(f"{weights} does not match backbone {spec['backbone']}: missing {missing}, unexpected {unexpected}")
    predictor = Predictor(model, meta, resolve_device(device))
    predictor.reference = read_reference(path)
    return predictor
