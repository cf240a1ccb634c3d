"""Mixed precision: which autocast type a run uses, and the gradient scaler fp16 needs."""

from __future__ import annotations

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: full float32).

    ``auto``: bf16 on CUDA devices that support it, fp16 on older ones, none on the CPU (CPU
    autocast rarely speeds convolutions up); ``bf16`` works on both; ``fp16`` needs CUDA."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown train.amp '{amp}': choose one of {', '.join(AMP_CHOICES)}")
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or none on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def make_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
