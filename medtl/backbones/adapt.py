"""Adapting pretrained tensors to a different input: channel count (stem) and 2D -> 3D inflation."""

from __future__ import annotations

import math

import torch


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem kernel (out, c, *k) reshaped to ``in_channels`` inputs, keeping the response.

    One channel: the kernels are summed over the colour axis, so a grey image gives exactly the
    response the RGB network gives to that image replicated in every channel.  N channels: the
    kernels are tiled to N and scaled by c / N, so every channel keeps pretrained filters and
    the response keeps its scale (exactly the original response to N identical channels when N
    is a multiple of c).
    """
    c = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    tiled = weight.repeat(1, math.ceil(in_channels / c), *([1] * (weight.dim() - 2)))[:, :in_channels]
    return tiled * (c / in_channels)


def inflate_to_3d(weight: torch.Tensor, depth: int, mode: str = "mean") -> torch.Tensor:
    """A 2D convolution kernel (out, in, h, w) inflated to (out, in, depth, h, w).

    ``mean`` (I3D): the kernel repeated along depth and divided by ``depth``, so a volume that
    is constant along depth gives the 2D response away from the depth borders.  ``centre``: the
    kernel on the centre slice and zeros elsewhere, so every slice gives exactly the 2D response.
    """
    if weight.dim() != 4:
        raise ValueError(f"inflate_to_3d expects a 2D kernel (out, in, h, w), got shape {tuple(weight.shape)}")
    if mode == "mean":
        return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if mode == "centre":
        inflated = weight.new_zeros(weight.shape[0], weight.shape[1], depth, *weight.shape[2:])
        inflated[:, :, depth // 2] = weight
        return inflated
    raise ValueError(f"unknown inflation mode '{mode}' (mean or centre)")
