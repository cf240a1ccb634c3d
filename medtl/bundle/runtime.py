"""How a :class:`~medtl.bundle.Predictor` runs its model fast: channels-last memory for 2D
CNNs, mixed precision on GPUs, and ``torch.compile`` that falls back to eager mode.

Each helper is safe on a CPU-only machine: AMP resolves to float32 there, and a compile that
fails (no compiler, unsupported operator) logs why and runs the plain model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for inference on ``device``: bfloat16 on GPUs that support it,
    float16 on older ones, ``None`` (float32) on the CPU or when ``enabled`` is false.

    CPU autocast is left off: without AMX units bfloat16 convolutions are slower than float32."""
    if not enabled:
        return None
    if device.type != "cuda":
        log.info("AMP is for GPUs; running in float32 on %s", device)
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class CompiledOrEager(nn.Module):
    """``torch.compile(model)`` on the first call; if compiling fails, the eager model from
    then on (with the reason logged), so ``--compile`` never costs a run."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model)
        self.failed: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self.compiled(x)
            except Exception as err:  # backend errors have no common base class
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log.warning("torch.compile failed, running the model uncompiled (%s)", self.failed)
        return self.model(x)


def uses_channels_last(model: nn.Module, spatial_dims: int) -> bool:
    """Channels-last pays off for 2D convolutional networks (oneDNN and cuDNN run NHWC
    convolutions faster); 3D networks and transformers gain nothing."""
    return spatial_dims == 2 and any(isinstance(m, nn.Conv2d) for m in model.modules())
