"""Grad-CAM overlays for ``medtl predict --cam DIR``: one PNG per scan showing where the model
looks, computed with MONAI's :class:`~monai.visualize.GradCAM` on the backbone's CAM layer from
the registry (``BackboneSpec.cam_layer``), so users never guess a layer name."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from monai.transforms import ScaleIntensity
from monai.visualize import GradCAM
from PIL import Image

from medtl.bundle import Predictor
from medtl.transforms import DISPLAY_LAYOUT

ALPHA = 0.4
MIN_SIDE = 256  # overlays are upsampled to at least this many pixels on their shorter side


def _unit_range(maps: torch.Tensor) -> np.ndarray:
    """Each map scaled to [0, 1] on its own (MONAI's default maps high activation to 0)."""
    scale = ScaleIntensity(minv=0.0, maxv=1.0)
    return np.stack([np.asarray(scale(m.detach().cpu())) for m in maps])


def _middle_slice(volume: np.ndarray) -> np.ndarray:
    """A 2D view of one channel-less image: itself, or the middle slice of a volume."""
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture: the grey image under the jet-coloured heat map (both 2D, rows x
    columns), upsampled to at least ``MIN_SIDE`` pixels on its shorter side."""
    span = np.ptp(image)
    grey = (image - image.min()) / span if span > 0 else np.zeros_like(image)
    rgb = (1 - ALPHA) * grey[..., None] + ALPHA * colormaps["jet"](heat)[..., :3]
    picture = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    scale = max(1.0, MIN_SIDE / min(picture.size))
    if scale > 1:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BILINEAR)
    return np.asarray(picture)


class CamWriter:
    """Writes ``DIR/<scan name>.png`` for each scan of a batch.

    The map is for the positive class of a binary bundle (where the model sees the finding),
    else for each scan's most probable class."""

    def __init__(self, predictor: Predictor, out_dir: str | Path) -> None:
        spec = predictor.model.spec
        if spec.cam_layout != "channels_first":
            raise ValueError(f"--cam: Grad-CAM on {spec.name} ({spec.cam_layout} feature maps) is not supported; "
                             "use a convolutional backbone")
        # A private copy in the default memory layout: the hooks stay off the predictor's model,
        # and MONAI reshapes gradients with .view(), which channels-last tensors refuse.
        model = copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format).eval()
        model.requires_grad_(True)
        # An ensemble's map is the mean of its members' maps (each member scores the class itself).
        members = getattr(model, "members", [model])
        self.cams = [GradCAM(nn_module=m, target_layers=f"backbone.{spec.cam_layer}", postprocessing=_unit_range) for m in members]
        self.predictor = predictor
        self.out_dir = Path(out_dir)
        pre = predictor.preprocessing
        # bundles from before the display layout feed 2D images as (columns, rows): turn them back to show them
        self.transpose = pre["spatial_dims"] == 2 and pre.get("layout") != DISPLAY_LAYOUT

    def path(self, name: str) -> Path:
        """Where the overlay of the scan called ``name`` goes (a name's folders are kept)."""
        return self.out_dir / (Path(name).as_posix().lstrip("/") + ".png")

    def write(self, names: Sequence[str], images: torch.Tensor) -> None:
        """Compute the maps of a preprocessed batch and save one overlay per scan."""
        if self.predictor.positive_index is not None:
            targets = np.full(len(images), self.predictor.positive_index)
        else:
            targets = self.predictor.logits(images).argmax(axis=1)
        maps = np.zeros((len(images), 1, *images.shape[2:]), dtype=np.float32)
        with torch.inference_mode(False), torch.enable_grad():
            for target in np.unique(targets):  # MONAI scores one class index per call
                rows = np.flatnonzero(targets == target)
                x = images[torch.as_tensor(rows)].to(self.predictor.device)
                maps[rows] = np.mean([cam(x=x, class_idx=int(target)) for cam in self.cams], axis=0)
        for name, image, heat in zip(names, images.cpu().numpy(), maps):
            target = self.path(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            image, heat = _middle_slice(image[0]), _middle_slice(heat[0])
            if self.transpose:
                image, heat = image.T, heat.T
            Image.fromarray(overlay(image, heat)).save(target)
