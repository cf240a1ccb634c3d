"""Every registry backbone builds in each of its dimensionalities for 1 and 3 input channels,
runs a forward pass, and keeps the contract's names (stem, classifier, Grad-CAM layer)."""

from __future__ import annotations

import pytest
import torch

from medtl.backbones import backbone_entries, create

# The smallest input each architecture accepts (ViT's position embedding fixes 224).
_SIZE = {"vit_b_16": 224, "densenet121": 32}


@pytest.mark.slow
@pytest.mark.parametrize("name,dims", backbone_entries(), ids=[f"{n}-{d}d" for n, d in backbone_entries()])
def test_builds_and_runs(name, dims):
    for channels in (1, 3):
        model = create(name, in_channels=channels, spatial_dims=dims, num_classes=3).eval()
        spec = model.spec
        size = _SIZE.get(name, 32 if dims == 2 else 16)
        x = torch.rand(1, channels, *[size] * dims)
        with torch.no_grad():
            features = model.forward_features(x)
            assert features.shape == (1, spec.feature_dim)
            assert model(x).shape == (1, 3)
        stem = model.backbone.get_submodule(spec.stem)
        assert stem.in_channels == channels and stem.weight.dim() == dims + 2
        assert isinstance(model.backbone.get_submodule(spec.classifier), torch.nn.Identity)
        model.backbone.get_submodule(spec.cam_layer)
