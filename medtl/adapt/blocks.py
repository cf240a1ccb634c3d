"""The ordered blocks of a backbone, input to output, found from its module tree alone.

Layer-wise learning-rate decay and gradual unfreezing need "the blocks" of a network.  Rather
than a per-architecture table, they are read off the module tree: the top-level children that
hold parameters, descending while there is only one (torchvision DenseNet/EfficientNet and MONAI
DenseNet keep everything in ``features``), with runs of consecutive leaf layers (a stem
convolution and its BatchNorm) merged into one block.  Parameters held directly by a container
(ViT's class token) join the first block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class Block:
    """One block: a name for logs and optimizer groups, its modules and its parameters."""

    name: str
    modules: list[nn.Module] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def backbone_blocks(backbone: nn.Module) -> list[Block]:
    """The blocks of ``backbone`` in forward order (first = nearest the input)."""
    root, prefix = backbone, ""
    loose: list[nn.Parameter] = []
    while True:
        loose += list(root.parameters(recurse=False))
        children = [(n, m) for n, m in root.named_children() if _has_params(m)]
        if len(children) != 1 or not any(True for _ in children[0][1].children()):
            break
        name, root = children[0]
        prefix = f"{prefix}{name}."
    blocks: list[Block] = []
    for name, module in children:
        leaf = not any(True for _ in module.children())
        if leaf and blocks and blocks[-1].modules and not any(True for _ in blocks[-1].modules[-1].children()):
            blocks[-1].name += f"+{name}"
        else:
            blocks.append(Block(prefix + name))
        blocks[-1].modules.append(module)
        blocks[-1].params += list(module.parameters())
    if not blocks:
        return [Block(prefix.rstrip(".") or "backbone", [root], loose)] if loose else []
    blocks[0].params = loose + blocks[0].params
    return blocks
