"""The catalysts' dynamics (catalyst-method.md section 9): k from the fused call, the threshold-corrected start,
the no-loss flow with and without the correction, decision times, gamma from the budget, the FLOPs model."""
import math

import pytest
import torch
from torch import nn

import catalyst_fused as cf
from catalyst_fused.models import build_model
from catalyst_fused.pruning.control import FlopsModel
from catalyst_fused.pruning.dynamics import (Coverage, auto_gamma, effective_rate, steps_to_decide,
                                             threshold_corrected_catalysts)
from catalyst_fused.pruning.metrics import count_flops
from catalyst_fused.pruning.surgery import prune_model
from catalyst_fused.pruning.targets import build_target_set, find_targets

from _helpers import no_loss_steps


def _coverage_counts(ts):
    """How many groups hold each element, from the layout's member table (independent of the kernels)."""
    counts = [torch.zeros_like(w, dtype=torch.float64) for w in ts.weights]
    for row in ts.layout.member_table.tolist():
        tensor, dim, start, count = row[:4]
        counts[tensor].narrow(dim, start, count).add_(1.0)
    return counts


@pytest.mark.parametrize("mode", ["group", "bn"])
def test_k_from_the_fused_call_is_the_overlapped_mass(mode):
    """With every c = 1, k_i = sum over the group of cov(e) w_e^2 / n_i^2 (cov = groups holding e): the fused
    gradient trick gives the same numbers as counting the memberships."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    ts = build_target_set(model, mode, input_shape=(1, 8, 8))
    norms = cf.group_norms(ts.weights, layout=ts.layout).double()
    cats = [d.detach().clone() for d in torch.split(norms.float(), list(ts.layout.segment_sizes))]
    st = Coverage(ts.weights, ts.layout)(cats)
    direct = cf.group_norms([(c.sqrt() * w.double()).float() for c, w in zip(_coverage_counts(ts), ts.weights)],
                            layout=ts.layout).double() ** 2 / norms ** 2
    torch.testing.assert_close(st.k, direct, rtol=1e-4, atol=1e-6)
    if mode == "bn":
        assert torch.allclose(st.k, torch.ones_like(st.k))  # no element in two groups
    else:
        assert float(st.k.min()) > 1.1 and float(st.k.max()) < 2.0  # rows and columns overlap


def test_corrected_catalysts_start_every_group_at_u_c0():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    ts = build_target_set(model, "group", input_shape=(1, 8, 8))
    for c0 in (1.0, 1.3):
        cats, st = threshold_corrected_catalysts(ts.weights, ts.layout, c0)
        torch.testing.assert_close(st.u, torch.full_like(st.u, c0), rtol=1e-5, atol=0)
        # the raw ratio is c0 / sqrt(k): below c0 wherever the group overlaps others
        torch.testing.assert_close(st.ratios, c0 / st.k.sqrt(), rtol=1e-5, atol=0)


def _no_loss_flow(pruner, model, steps):
    """Momentum SGD on gamma * R only (zero loss gradients), through the pruner's step calls; the corrected
    statistic's extremes after every 20 steps."""
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    extremes = []
    for step in range(steps):
        no_loss_steps(pruner, model, opt, 1)
        if step % 20 == 19:
            s = torch.cat(pruner.scores())
            extremes.append((float(s.min()), float(s.max())))
    return extremes


def test_no_loss_flow_keeps_every_resnet56_group_at_the_threshold_and_uncorrected_ones_decide():
    """ResNet-56, group mode, the rate gamma='auto' picks for a 660-step budget: without loss gradients the
    corrected catalysts (started at u = 1, threshold tracked) stay near u = 1 for the first half of the budget,
    by when a channel 2% off the threshold is decided; catalysts started at d = n (c = 1) have u = sqrt(k) > 1
    and are all on their way to pruning long before."""
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10, in_channels=3)
    targets = find_targets(model, (3, 32, 32))
    pruner = cf.Pruner(model, (3, 32, 32), gamma="auto", budget_steps=660, c0=1.0, kappa=1.0, targets=targets)
    extremes = _no_loss_flow(pruner, model, 330)
    worst = max(max(abs(a), abs(b)) for a, b in extremes)
    assert worst < 0.02, worst  # within 5% of the threshold (measured: 0.008); decided would be 1 decade
    spread = max(b - a for a, b in extremes)
    assert spread < 0.005, spread  # and the groups move together (no bias by group structure)
    assert int(pruner.method.control.summary()["decided"]) == 0

    # the same flow from the uncorrected start d_i = n_i: every group starts at u = sqrt(k_i) ~ 1.3
    torch.manual_seed(0)
    plain = build_model("resnet56", num_classes=10, in_channels=3)
    ts = build_target_set(plain, "group", targets=targets)
    cats = cf.init_catalysts(ts.weights, c0=1.0, layout=ts.layout)
    lam = pruner.rate()
    opt = torch.optim.SGD([{"params": ts.weights}, {"params": cats}], lr=0.005, momentum=0.9)
    cov = Coverage(ts.weights, ts.layout)
    assert float(cov(cats).u.min()) > 1.25
    for step in range(200):  # predicted: decided after ~170 steps
        opt.zero_grad(set_to_none=False)
        cf.penalty_(ts.weights, cats, scale=pruner.gamma, layout=ts.layout)
        opt.step()
    u = cov(cats).u
    assert float(torch.log10(u).min()) > 1.0  # every channel past the prune-side decision line
    assert lam == pytest.approx(effective_rate(0.005, pruner.gamma, 0.9))


def test_c0_off_the_threshold_splits_when_the_flow_predicts():
    """BN mode (k = 1): started at u = 1 +- 5%, every channel is decided on its side (except, above the
    threshold, each target's width floor: 4 of 32 and 7 of 64 channels kept with the default
    max_prune_fraction), and the first decisions come when steps_to_decide predicts (within 15%)."""
    torch.manual_seed(0)
    results = {}
    for c0 in (1.05, 1 / 1.05):
        model = build_model("small_cnn", num_classes=10, in_channels=1)
        pruner = cf.Pruner(model, (1, 8, 8), mode="bn", gamma=0.1, c0=c0, kappa=1.0)
        _no_loss_flow(pruner, model, 450)  # predicted: 361 steps
        control = pruner.method.control
        steps = control.decided_at[control.decided_at >= 0].double()
        results[c0] = (control.summary(), float(steps.mean()),
                       float(steps_to_decide(c0, 1.0, pruner.rate(), pruner.kappa)))
    up, down = results[1.05], results[1 / 1.05]
    floors = sum(pruner.method.control.floors)
    assert floors == 4 + 7 + 7
    assert up[0]["pruned"] == up[0]["channels"] - floors and up[0]["kept_decided"] == up[0]["forced"] == floors
    assert up[0]["spared_by_width_floor"] == floors
    assert down[0]["kept_decided"] == down[0]["channels"] and down[0]["forced"] == 0
    for _, measured, predicted in (up, down):
        assert measured == pytest.approx(predicted, rel=0.15)


def test_steps_to_decide_and_auto_gamma_agree():
    lam = 2e-3
    t = float(steps_to_decide(1.02, 1.7, lam, 1.0))
    assert t == pytest.approx((math.log(9 / 11) - math.log(0.02 / 2.02)) / (2 * lam * math.sqrt(1.7)) + 10, rel=1e-9)
    assert float(steps_to_decide(1.0, 1.7, lam, 1.0)) == math.inf
    assert float(steps_to_decide(0.98, 1.0, lam, 1.0)) > 0
    # gamma="auto": the 2%-off channel decides at half the budget
    gamma = auto_gamma(1000, lr=0.01, momentum=0.9, k_mean=1.7, kappa=1.0)
    assert float(steps_to_decide(1.02, 1.7, effective_rate(0.01, gamma, 0.9), 1.0)) == pytest.approx(500, rel=1e-6)
    with pytest.raises(ValueError, match="budget"):
        auto_gamma(0, lr=0.01, momentum=0.9, k_mean=1.7, kappa=1.0)


# mobilenetv2_cifar: depthwise convolutions; vit_cifar: heads (several rows per channel) and
# nn.MultiheadAttention's projections, which run functionally, not as modules
@pytest.mark.parametrize("name", ["resnet56", "small_cnn", "vgg19_bn", "mobilenetv2_cifar", "vit_cifar"])
def test_flops_model_matches_counting_the_pruned_model(name):
    torch.manual_seed(0)
    channels, size = {"small_cnn": (1, 8), "mobilenetv2_cifar": (3, 8), "vit_cifar": (3, 8)}.get(name, (3, 32))
    model = build_model(name, num_classes=10, in_channels=channels, image_size=size)
    targets = find_targets(model, (channels, size, size))
    fm = FlopsModel(model, targets, (channels, size, size))
    dense = count_flops(model, (channels, size, size))["macs"]
    assert fm.total == dense
    gen = torch.Generator().manual_seed(1)
    for fraction in (0.1, 0.5):
        masks = [torch.rand(t.channels, generator=gen) < fraction for t in targets]
        for m in masks:
            m[0] = False  # no target loses every channel
        keep = {t.name: ~m for t, m in zip(targets, masks)}
        pruned = count_flops(prune_model(model, targets, keep), (channels, size, size))["macs"]
        assert float(fm.macs(torch.cat(masks))) == pytest.approx(pruned, rel=1e-9)


def test_flops_model_refuses_a_grouped_convolution_in_a_target():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    from catalyst_fused.pruning.targets import ModuleSlice, Target

    target = Target("0", 8, [ModuleSlice("0", 0, 8)], [ModuleSlice("1", 0, 8)], [ModuleSlice("3", 0, 8)])
    with pytest.raises(ValueError, match="grouped convolution 3"):
        FlopsModel(model, [target], (3, 8, 8))
