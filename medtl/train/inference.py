"""A model's logits over a loader: what training, validation, the calibration set and the scripts
all need, without a :class:`~medtl.train.Trainer`."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from medtl.train.distributed import gather_sharded


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device | str | None = None, *,
                   amp_dtype: torch.dtype | None = None,
                   memory_format: torch.memory_format = torch.contiguous_format) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels of every item in ``loader`` (dicts with ``image`` and ``label``),
    model in eval mode on ``device`` (default: where its parameters are), autocast to ``amp_dtype``
    when given.  A loader sharded across ranks (:func:`medtl.train.data.sharded`) gives every rank
    the whole set, in dataset order."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    logits, labels = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        with autocast:
            logits.append(model(images).float())
        labels.append(torch.as_tensor(batch["label"]).to(device))
    logits_t, labels_t = torch.cat(logits), torch.cat(labels)
    if isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas > 1:
        total = len(loader.dataset)
        logits_t, labels_t = gather_sharded(logits_t, total), gather_sharded(labels_t, total)
    return logits_t.cpu().numpy(), labels_t.cpu().numpy()
