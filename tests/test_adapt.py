"""Fine-tuning strategies, domain-adaptation losses, AdaBN/TENT and label-free selection."""

import copy
import csv
import json
import math

import pytest
import torch
from torch import nn

from helpers import TinyClassifier, tiny_loader
from medtl.adapt import (
    CoralLoss,
    DomainAdversarialLoss,
    GradientReverseLayer,
    MultiKernelMMDLoss,
    Tent,
    adabn,
    adapt_normalization,
    backbone_blocks,
    batch_statistics,
    dann_coefficient,
    information_maximization,
    make_domain_loss,
    make_strategy,
    prediction_entropy,
    reverse_gradient,
    soft_neighborhood_density,
)
from medtl.backbones import create
from medtl.config import AdaptConfig, Config, TrainConfig
from medtl.train import Trainer, predict_logits

# -- gradient reversal ------------------------------------------------------------------------


def test_gradient_reversal_flips_and_scales_exactly():
    x = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    y = reverse_gradient(x, 0.37)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -0.37 * upstream)


def test_gradient_reverse_layer_follows_dann_schedule():
    layer = GradientReverseLayer(max_coeff=2.0)
    layer.set_progress(0.0)
    assert layer.coeff == 0.0
    layer.set_progress(0.5)
    assert layer.coeff == pytest.approx(2.0 * (2 / (1 + math.exp(-5)) - 1))
    assert dann_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    x = torch.ones(3, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -layer.coeff))


# -- discrepancy losses -----------------------------------------------------------------------


@pytest.mark.parametrize("loss", [CoralLoss(), MultiKernelMMDLoss()], ids=["coral", "mmd"])
def test_discrepancy_is_zero_for_identical_batches_and_grows_with_shift(loss):
    g = torch.Generator().manual_seed(0)
    source = torch.randn(64, 16, generator=g)
    assert float(loss(source, source.clone())) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(64, 16, generator=g)
    values = [float(loss(source, noise * (1 + s) + s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 5 * values[0] > 0


def test_domain_adversarial_loss_handles_many_sites_and_reverses_into_features():
    loss = DomainAdversarialLoss(8, num_domains=3)
    loss.set_progress(1.0)
    features = torch.randn(12, 8, requires_grad=True)
    value = loss(features, torch.arange(3).repeat(4))
    value.backward()
    assert value.item() > 0 and features.grad.abs().sum() > 0
    with torch.no_grad():
        predicted = loss.discriminator(features).argmax(1)
    assert loss.domain_accuracy == pytest.approx(float((predicted == torch.arange(3).repeat(4)).float().mean()))


def test_cdan_uses_randomized_map_for_large_products():
    term = make_domain_loss("cdan", 600, 2)
    assert term.loss.adversarial.randomized
    value = term(torch.randn(4, 600), torch.randn(4, 600), torch.randn(4, 2), torch.randn(4, 2))
    assert torch.isfinite(value)
    assert make_domain_loss("adabn", 8, 2) is None


# -- normalisation-layer adaptation ----------------------------------------------------------


def _norm_net(dims: int = 2) -> nn.Module:
    conv, bn, inorm = (nn.Conv2d, nn.BatchNorm2d, nn.InstanceNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d, nn.InstanceNorm3d)
    return nn.Sequential(
        conv(1, 8, 3, padding=1), bn(8), nn.ReLU(),
        conv(8, 8, 3, padding=1), nn.GroupNorm(2, 8), inorm(8, affine=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3),
    )


def _changed(before: dict, model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_adabn_changes_only_batchnorm_statistics_to_target_values():
    torch.manual_seed(0)
    model = _norm_net().eval()
    before = copy.deepcopy(model.state_dict())
    target = [torch.randn(16, 1, 8, 8) * 3 + 2 for _ in range(3)]
    adabn(model, [{"image": x} for x in target])
    changed = _changed(before, model)
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed)
    with torch.no_grad():
        first = model[0](torch.cat(target))
    torch.testing.assert_close(model[1].running_mean, first.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not model.training


@pytest.mark.parametrize("dims", [2, 3])
def test_tent_changes_only_norm_affine_parameters_and_lowers_entropy(dims):
    torch.manual_seed(0)
    model = _norm_net(dims)
    x = torch.randn(16, 1, *([6] * dims)) * 2 + 1
    before = copy.deepcopy(model.state_dict())

    def entropy() -> float:
        with torch.no_grad(), batch_statistics(model):
            return float(prediction_entropy(model(x)).mean())

    start = entropy()
    tent = Tent(model, lr=1e-2, steps=5)
    tent(x)
    affine = {f"{name}.{p}" for name, m in model.named_modules()
              if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
                                nn.InstanceNorm2d, nn.InstanceNorm3d)) for p in ("weight", "bias")}
    changed = _changed(before, model)
    assert changed and changed <= affine
    assert entropy() < start


def test_tent_episodic_resets_before_each_batch():
    model = _norm_net()
    before = copy.deepcopy(model.state_dict())
    tent = Tent(model, lr=1e-2, steps=1, episodic=True)
    first = tent(torch.randn(8, 1, 6, 6))
    tent(torch.randn(8, 1, 6, 6))
    tent.reset()
    assert not _changed(before, model)
    assert first.shape == (8, 3)


# -- selection scores ------------------------------------------------------------------------


def test_information_maximization_prefers_confident_diverse_predictions():
    confident_diverse = torch.tensor([[9.0, 0], [0, 9.0]]).repeat(8, 1)
    collapsed = torch.tensor([[9.0, 0]]).repeat(16, 1)
    uncertain = torch.zeros(16, 2)
    assert information_maximization(confident_diverse) > information_maximization(uncertain)
    assert information_maximization(confident_diverse) > information_maximization(collapsed)
    # Two tight clusters of 8: each scan's soft neighbourhood is its 7 twins (diagonal excluded).
    clustered = torch.eye(2).repeat(8, 1) * 20
    assert soft_neighborhood_density(clustered) == pytest.approx(math.log(7), abs=1e-3)


# -- strategies ------------------------------------------------------------------------------


def _backbone_state(model: nn.Module) -> dict:
    return copy.deepcopy(model.backbone.state_dict())


def test_blocks_of_registry_backbones_cover_every_parameter():
    for name, dims in [("resnet18", 2), ("densenet121", 2), ("efficientnet_b0", 2), ("resnet10", 3), ("densenet121", 3)]:
        backbone = create(name, weights="none", spatial_dims=dims).backbone
        blocks = backbone_blocks(backbone)
        assert len(blocks) >= 5, name
        ids = [id(p) for b in blocks for p in b.params]
        assert sorted(ids) == sorted(id(p) for p in backbone.parameters()), name
    assert [b.name for b in backbone_blocks(create("resnet18", weights="none").backbone)] == [
        "conv1+bn1", "layer1", "layer2", "layer3", "layer4"]


def test_layer_wise_rates_appear_in_optimizer_groups():
    model = create("resnet18", weights="none")
    strategy = make_strategy(AdaptConfig(layer_decay=0.5, head_lr_multiplier=4))
    trainer = Trainer(model, strategy, TrainConfig(lr=1e-3, device="cpu"))
    rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert rates == {
        "conv1+bn1": pytest.approx(1e-3 * 0.5**4), "layer1": pytest.approx(1e-3 * 0.5**3),
        "layer2": pytest.approx(1e-3 * 0.25), "layer3": pytest.approx(1e-3 * 0.5), "layer4": pytest.approx(1e-3),
        "head": pytest.approx(4e-3),
    }
    grouped = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_lp_ft_stage_one_leaves_backbone_bit_identical_then_fine_tunes():
    torch.manual_seed(0)
    model = TinyClassifier()
    before = _backbone_state(model)
    head = model.head.weight.clone()
    adapt = AdaptConfig(strategy="lp_ft", probe_epochs=2, stage2_lr_factor=0.1)
    trainer = Trainer(model, make_strategy(adapt), TrainConfig(epochs=2, lr=1e-2, patience=5, device="cpu"))
    trainer.fit(tiny_loader(32), tiny_loader(16, seed=1))
    assert not _changed(before, model.backbone)  # weights and BatchNorm statistics
    assert not torch.equal(model.head.weight, head)

    model = TinyClassifier()
    before = _backbone_state(model)
    trainer = Trainer(model, make_strategy(adapt), TrainConfig(epochs=3, lr=1e-2, patience=5, device="cpu"))
    strategy = trainer.strategy
    assert [strategy.lr_scale(e, 3) for e in (1, 2, 3)] == [1.0, 1.0, 0.1]
    trainer.fit(tiny_loader(32), tiny_loader(16, seed=1))
    assert _changed(before, model.backbone)


def test_gradual_unfreeze_opens_one_block_from_the_top_every_k_epochs():
    model = TinyClassifier()
    strategy = make_strategy(AdaptConfig(strategy="gradual_unfreeze", unfreeze_every=2))
    Trainer(model, strategy, TrainConfig(epochs=8, device="cpu"))
    assert [b.name for b in strategy.blocks] == ["conv1+bn1", "layer1", "layer2"]
    opened = [sorted(strategy.trainable_blocks(e, 8)) for e in range(1, 8)]
    assert opened == [[], [], [2], [2], [1, 2], [1, 2], [0, 1, 2]]
    strategy.start_epoch(3, 8)
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())


@pytest.mark.parametrize("mode", ["frozen_stats", "frozen"])
def test_batchnorm_modes(mode):
    torch.manual_seed(0)
    model = TinyClassifier()
    before = _backbone_state(model)
    trainer = Trainer(model, make_strategy(AdaptConfig(bn=mode)), TrainConfig(epochs=1, lr=1e-2, device="cpu"))
    trainer.fit(tiny_loader(32, shift=2.0), tiny_loader(16, seed=1))
    changed = _changed(before, model.backbone)
    assert not any("running" in k or "num_batches" in k for k in changed)
    bn_affine = {"bn1.weight", "bn1.bias", "layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}
    assert (changed & bn_affine) == (set() if mode == "frozen" else bn_affine)
    assert "layer1.0.weight" in changed


def test_l2sp_penalises_distance_to_the_starting_weights():
    model = TinyClassifier()
    strategy = make_strategy(AdaptConfig(l2sp=0.5))
    trainer = Trainer(model, strategy, TrainConfig(device="cpu", weight_decay=0.1))
    assert strategy.penalty().item() == 0.0
    assert {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups} == {"backbone": 0.0, "head": 0.1}
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    assert strategy.penalty().item() == pytest.approx(0.25 * model.backbone.conv1.weight.numel())
    assert make_strategy("full").penalty() is None


def test_selection_by_target_score_logs_and_keeps_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    target = tiny_loader(24, seed=2, shift=1.0)
    trainer = Trainer(TinyClassifier(), make_strategy("full"), TrainConfig(epochs=3, lr=1e-2, patience=5, device="cpu"), selection="snd")
    result = trainer.fit(tiny_loader(32), tiny_loader(16, seed=1), target_loader=target, log_path=tmp_path / "log.csv")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert {"target_im", "target_entropy", "target_snd"} <= set(rows[0])
    best = max(result.history, key=lambda r: (r["target_snd"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"] and result.selection == "snd"
    with pytest.raises(ValueError, match="needs unlabelled target scans"):
        Trainer(TinyClassifier(), make_strategy("full"), TrainConfig(device="cpu"), selection="im").fit(tiny_loader(16), tiny_loader(16))


# -- every strategy and method from a config, 2D and 3D ---------------------------------------

RUNS = [
    {"strategy": "full"}, {"strategy": "linear_probe"}, {"strategy": "lp_ft"}, {"strategy": "gradual_unfreeze"},
    {"layer_decay": 0.7}, {"l2sp": 0.01}, {"bn": "frozen_stats"}, {"bn": "frozen"},
    {"domain": "dann"}, {"domain": "cdan"}, {"domain": "coral"}, {"domain": "mmd"}, {"domain": "adabn"}, {"domain": "tent"},
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("adapt", RUNS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_each_strategy_and_method_runs_from_a_config(adapt, dims):
    torch.manual_seed(0)
    config = Config.model_validate({
        "data": {"spatial_dims": dims}, "model": {"backbone": "resnet18" if dims == 2 else "resnet10", "weights": "none"},
        "adapt": adapt, "train": {"epochs": 2, "lr": 1e-3, "device": "cpu"},
    })
    model = create(config.model.backbone, weights="none", spatial_dims=dims)
    a = config.adapt
    domain = make_domain_loss(a.domain, model.feature_dim, 2, weight=a.domain_weight, entropy_conditioning=a.cdan_entropy)
    size = 16 if dims == 2 else 8
    target = tiny_loader(16, dims=dims, seed=2, shift=1.0, size=size)
    trainer = Trainer(model, make_strategy(a), config.train, domain=domain, selection=a.selection)
    result = trainer.fit(tiny_loader(16, dims=dims, size=size), tiny_loader(16, dims=dims, seed=1, size=size), target_loader=target)
    adapt_normalization(trainer.model, a.domain, target, tent_lr=a.tent_lr, device="cpu")
    assert len(result.history) == 2
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["target_im"]) for r in result.history)
    if domain is not None:
        assert all(math.isfinite(r["domain_loss"]) for r in result.history)
    logits, _ = predict_logits(trainer.model, target)
    assert logits.shape == (16, 2) and torch.isfinite(torch.as_tensor(logits)).all()


# -- the pipeline ----------------------------------------------------------------------------


def _two_site(tmp_path):
    from medtl.io import write_synthetic

    paths = write_synthetic(tmp_path / "data", patients_per_site=14, test_per_site=2)
    rows = list(csv.DictReader(open(paths["manifest"])))
    for row in rows:
        if row["site"] == "B":
            row["label"] = ""
    with open(paths["manifest"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return paths["manifest"]


@pytest.mark.slow
def test_pipeline_adapts_to_unlabelled_site_rows(tmp_path):
    from medtl.pipeline import train

    config = Config.model_validate({
        "data": {"manifest": str(_two_site(tmp_path)), "image_size": [32, 32], "num_workers": 0},
        "model": {"backbone": "resnet18", "weights": "none"},
        "adapt": {"domain": "dann", "selection": "im"},
        "train": {"epochs": 2, "batch_size": 8, "device": "cpu"},
    })
    outcome = train(config, tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))
    assert len(rows) == 2 and {"domain_loss", "target_im", "target_snd"} <= set(rows[0])
    training = json.loads((outcome.bundle / "bundle.json").read_text())["training"]
    assert training["selection"] == "im"
    assert training["adaptation"]["domain"] == "dann" and training["adaptation"]["target_scans"] > 10


def test_pipeline_names_missing_target_scans(tmp_path):
    from medtl.io import write_synthetic
    from medtl.pipeline import train

    manifest = write_synthetic(tmp_path / "data", patients_per_site=4, test_per_site=1)["manifest"]
    config = Config.model_validate({"data": {"manifest": str(manifest)}, "adapt": {"domain": "coral"}})
    with pytest.raises(ValueError, match="need unlabelled target scans"):
        train(config, tmp_path / "run")



def test_early_stopping_waits_for_the_last_stage():
    strategy = make_strategy(AdaptConfig(strategy="lp_ft", probe_epochs=4))
    trainer = Trainer(TinyClassifier(), strategy, TrainConfig(epochs=6, lr=1e-9, head_lr=1e-9, patience=1, device="cpu"))
    assert strategy.last_stage_start(6) == 5
    result = trainer.fit(tiny_loader(32), tiny_loader(16, seed=1))
    assert len(result.history) >= 5  # patience 1 would stop inside the probe stage (epochs 1-4)
    gradual = make_strategy(AdaptConfig(strategy="gradual_unfreeze"))
    Trainer(TinyClassifier(), gradual, TrainConfig(epochs=8, device="cpu"))
    assert len(gradual.blocks) == 3 and gradual.last_stage_start(8) == 4  # one more block each epoch


@pytest.mark.slow
def test_pipeline_calibrates_before_adabn_and_bundles_the_adapted_model(tmp_path):
    """AdaBN re-normalises after calibration: the bundle's calibrator, threshold and report come
    from the model as trained (equal to a run without AdaBN), only BatchNorm statistics differ."""
    from medtl import bundle as bundles
    from medtl.pipeline import train

    manifest = _two_site(tmp_path)

    def run(domain: str):
        config = Config.model_validate({
            "data": {"manifest": str(manifest), "image_size": [32, 32], "num_workers": 0},
            "model": {"backbone": "resnet18", "weights": "none"},
            "adapt": {"domain": domain},
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
            "report": {"bootstrap": 100},
        })
        outcome = train(config, tmp_path / domain)
        return outcome, bundles.load(outcome.bundle, device="cpu")

    plain, plain_bundle = run("none")
    adapted, adapted_bundle = run("adabn")
    assert adapted_bundle.calibrator.to_dict() == plain_bundle.calibrator.to_dict()
    assert adapted_bundle.operating_point == plain_bundle.operating_point
    assert adapted.metrics["calibrated"]["auroc"]["auc"] == plain.metrics["calibrated"]["auroc"]["auc"]
    assert "before its adabn step" in adapted.metrics["info"]["evaluated_on"]
    before, after = plain_bundle.model.state_dict(), adapted_bundle.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


@pytest.mark.slow
def test_pipeline_warns_that_source_validation_cannot_see_an_adversarial_collapse(tmp_path, caplog):
    from medtl.pipeline import train

    config = Config.model_validate({
        "data": {"manifest": str(_two_site(tmp_path)), "image_size": [32, 32], "num_workers": 0},
        "model": {"backbone": "resnet18", "weights": "none"},
        "adapt": {"domain": "dann"},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
        "report": {"bootstrap": 100},
    })
    with caplog.at_level("WARNING", logger="medtl.pipeline"):
        train(config, tmp_path / "run")
    assert any("source-validation model selection" in r.message and "medtl evaluate" in r.message for r in caplog.records)
