"""What the pruner does around every step for Catalyst (catalyst-method.md section 9): decided channels stay
decided (frozen catalysts), the target feedback, the end of the budget, the lossless removal of channels that
still output their BN shift, the BatchNorm re-estimation, and the random-pruning control."""
import pytest
import torch
from torch import nn

import catalyst_fused as cf
from catalyst_fused.models import build_model
from catalyst_fused.pruning import recalibrate_bn
from catalyst_fused.pruning.control import KEPT, PRUNED, UNDECIDED

from _helpers import no_loss_steps


def test_decided_channels_stay_decided_and_their_catalysts_frozen():
    """BN mode, half the channels started above the threshold and half below: once a channel passes |log10 u| >
    kappa it is frozen; pushing its statistic back across the line (its BN scale and shift set to 10) does not
    undecide it, its catalyst keeps its value through further momentum steps, and the count of decided channels
    never falls."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    pruner = cf.Pruner(model, (1, 8, 8), mode="bn", gamma=0.1, c0=1.0, kappa=1.0, prune_pull=False)
    with torch.no_grad():  # a deterministic split: even channels start at u = 1.1, odd ones at u = 0.9
        for d in pruner.catalysts:
            d[0::2] *= 1.1
            d[1::2] *= 0.9
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    control = pruner.method.control
    counts = []
    for _ in range(30):
        no_loss_steps(pruner, model, opt, 20)
        counts.append(int((control.state != UNDECIDED).sum()))
    assert counts == sorted(counts) and counts[-1] == control.state.numel()
    assert pruner.all_decided()
    sides = torch.cat([torch.tensor([1, -1]).repeat(d.numel() // 2) for d in pruner.catalysts])
    assert torch.equal(control.state.long(), sides)  # every channel on the side it started on
    frozen = torch.cat([d.detach().clone() for d in pruner.catalysts])
    bn = model.bn1
    with torch.no_grad():  # the data "wants" a pruned channel back: its statistic drops below the line
        bn.weight[0] = 10.0
        bn.bias[0] = 10.0
    assert float(pruner.scores()[0][0]) < 0
    no_loss_steps(pruner, model, opt, 5)
    assert control.state[0] == PRUNED and bool(pruner.decisions()[0].prune[0])
    torch.testing.assert_close(torch.cat([d.detach() for d in pruner.catalysts]), frozen, rtol=0, atol=0)
    # the stop rule waits until a just-decided group had time to shrink
    assert pruner.settle_steps() > 10


def _held_up_steps(pruner, model, opt, steps: int, push: float) -> None:
    """No-loss steps, except that a "loss" pushes channel 0 of bn1 (scale and shift) up with a constant
    gradient ``push``: stronger than its frozen catalyst's pull ``gamma |d|``, as the data can hold a channel
    that the flow put on the prune side."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        model.bn1.weight.grad[0] = -push
        model.bn1.bias.grad[0] = -push
        pruner.regularize()
        opt.step()
        pruner.after_step()


@pytest.mark.parametrize("pull", [True, False])
def test_the_pull_empties_a_pruned_group_the_loss_holds_up(pull):
    """BN mode: the even channels decide on the prune side (no loss), then a loss gradient stronger than the
    frozen pull holds channel 0 of bn1 up. Without the pull it grows back (what made BN-mode removals lossy);
    with it (the default) its catalyst grows until the pull wins, and the group ends exactly at zero, as does
    every other pruned group; kept channels and their catalysts are untouched."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    pruner = cf.Pruner(model, (1, 8, 8), mode="bn", gamma=0.1, c0=1.0, kappa=1.0, prune_pull=pull)
    with torch.no_grad():
        for d in pruner.catalysts:
            d[0::2] *= 1.1
            d[1::2] *= 0.9
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    control = pruner.method.control
    for _ in range(30):
        no_loss_steps(pruner, model, opt, 20)
        if bool((control.state != UNDECIDED).all()):
            break
    assert bool((control.state != UNDECIDED).all())
    d0 = float(pruner.catalysts[0][0].detach())
    assert 0.1 * abs(d0) < 0.2  # the push below is stronger than the frozen pull gamma |d|
    kept_d = torch.cat([d.detach().clone() for d in pruner.catalysts])[control.state == KEPT]
    _held_up_steps(pruner, model, opt, 300, push=0.2)
    bn = model.bn1
    n0 = float(torch.hypot(bn.weight[0], bn.bias[0]))
    assert control.state[0] == PRUNED
    if not pull:
        assert n0 > 0.5 and float(pruner.catalysts[0][0].detach()) == d0  # the loss won: the channel is back
        return
    assert n0 == 0.0 and abs(float(pruner.catalysts[0][0].detach())) > 0.2 / 0.1  # the pull grew past the push
    pruned = control.split(control.state == PRUNED)
    for bn, mask in zip((model.bn1, model.bn2, model.bn3), pruned):
        assert bool((bn.weight[mask] == 0).all()) and bool((bn.bias[mask] == 0).all())
        assert bool((bn.weight[~mask] != 0).all())
    kept_now = torch.cat([d.detach() for d in pruner.catalysts])[control.state == KEPT]
    torch.testing.assert_close(kept_now, kept_d, rtol=0, atol=0)


def test_the_end_of_the_budget_decides_every_channel_by_its_side():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    pruner = cf.Pruner(model, (1, 8, 8), mode="bn", gamma=1e-4, c0=1.0, kappa=1.0, budget_steps=50)
    with torch.no_grad():
        for d in pruner.catalysts:
            d[: d.numel() // 4] *= 1.001
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    no_loss_steps(pruner, model, opt, 39)
    control = pruner.method.control
    assert int((control.state == UNDECIDED).sum()) == control.state.numel()  # far too slow to decide by itself
    no_loss_steps(pruner, model, opt, 1)  # step 40 = 80% of the budget
    assert pruner.force_step == 40 and not bool((control.state == UNDECIDED).any()) and bool(control.forced.all())
    s = torch.cat(pruner.scores())
    assert bool((s[control.state == PRUNED] >= 1.0 - 1e-6).all()) and bool((s[control.state == KEPT] <= -1.0 + 1e-6).all())
    assert int((control.state == PRUNED).sum()) == sum(d.numel() // 4 for d in pruner.catalysts)


@pytest.mark.parametrize("fraction", [1.0, 0.9])
def test_no_target_is_decided_below_its_width_floor(fraction):
    """Every channel of the first target (32 of them) starts above the threshold (the others below): its
    channels are decided on the prune side, except the last ``min_width`` of them (1 with fraction 1, 4 with
    the default 0.9), which are kept (moved to the keep side, counted as forced and spared), so that what the
    control predicts is what the removal obtains."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    pruner = cf.Pruner(model, (1, 8, 8), mode="bn", gamma=0.1, c0=1.0, kappa=1.0, max_prune_fraction=fraction)
    with torch.no_grad():
        first = pruner.catalysts[0]
        first *= 1.1
        first[3] /= 1.05  # the slowest of them: one of those left when the others have gone
        for d in pruner.catalysts[1:]:
            d *= 0.9
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    control = pruner.method.control
    for _ in range(40):
        no_loss_steps(pruner, model, opt, 20)
        if pruner.all_decided():
            break
    assert pruner.all_decided()
    n = first.numel()
    floor = 1 if fraction == 1.0 else 4
    assert control.floors[0] == floor
    state = control.state[:n]
    assert int((state == PRUNED).sum()) == n - floor and state[3] == KEPT and bool(control.forced[3])
    assert bool(control.spared[:n][state == KEPT].all()) and int(control.spared.sum()) == floor
    assert float(control.statistic_at_decision[3]) == pytest.approx(-1.0)  # moved to the keep side when frozen
    assert float(pruner.scores()[0][3]) < 0  # and still there
    assert not bool(control.forced[:n][state == PRUNED].any())
    decision = pruner.decisions()[0]
    assert torch.equal(decision.prune, state == PRUNED) and decision.forced_keep
    assert control.summary()["spared_by_width_floor"] == floor


@pytest.mark.parametrize("target", [None, 1000.0])
def test_feedback_and_end_of_budget_stop_at_the_width_floor(target):
    """The VGG-19-BN failure in small: every channel of the first target sits just above the threshold (no
    target), or an unreachable target speed-up pushes every undecided channel to the prune side (1000x). The end
    of the budget decides them all by their side, but no target goes below its floor (4 of 32, 7 of 64), the
    channels kept back are the least pruned ones, and the FLOPs the control predicts are the removal's."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    pruner = cf.Pruner(model, (1, 8, 8), mode="bn", gamma=1e-4, c0=1.0, kappa=1.0, budget_steps=50,
                       target_speedup=target)
    with torch.no_grad():
        first = pruner.catalysts[0]
        first *= 1.001
        first[:5] *= torch.tensor([0.9999, 0.99985, 0.9998, 0.99975, 0.9997])  # the five least pruned
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    control = pruner.method.control
    no_loss_steps(pruner, model, opt, 40)  # step 40 = 80% of the budget
    assert not bool((control.state == UNDECIDED).any()) and bool(control.forced.all())
    assert control.floors == [4, 7, 7]
    kept = [int((st != PRUNED).sum()) for st in control.split(control.state)]
    if target is None:
        assert kept[0] == 4 and kept[1:] == [64, 64]
        assert (control.split(control.state)[0][:5] == KEPT).tolist() == [False, True, True, True, True]
    else:
        assert kept == [4, 7, 7]
    decisions = pruner.decisions()
    assert [d.channels - int(d.prune.sum()) for d in decisions] == kept
    assert decisions[0].forced_keep
    predicted = float(pruner.flops_model().ratio(control.state == PRUNED))
    summary = pruner.prune()
    assert summary.macs_before / summary.macs_after == pytest.approx(predicted, rel=1e-9)


def test_target_feedback_holds_the_predicted_speedup():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.randn(256, 1, 8, 8)
    y = torch.randint(0, 10, (256,))
    pruner = cf.Pruner(model, (1, 8, 8), gamma="auto", budget_steps=60, target_speedup=2.5)
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.01, momentum=0.9)))
    assert pruner.gamma > 0  # resolved from the budget when the optimizer was attached
    control = pruner.method.control
    for step in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step % 4 * 64:][:64]), y[step % 4 * 64:][:64]).backward()
        pruner.regularize()
        opt.step()
        pruner.after_step()
    s = torch.cat(pruner.scores())
    predicted = (control.state == PRUNED) | ((control.state == UNDECIDED) & (s > 0))
    assert float(pruner.flops_model().ratio(predicted)) == pytest.approx(2.5, rel=0.1)
    assert control.total_shift != 0.0
    # the pruner's state carries the control: a rebuilt pruner has the same decisions and shifts
    fresh = build_model("small_cnn", num_classes=10, in_channels=1)
    again = cf.Pruner(fresh, (1, 8, 8), gamma="auto", budget_steps=60, target_speedup=2.5)
    again.load_state_dict(pruner.state_dict())
    assert torch.equal(again.method.control.state, control.state)
    assert again.method.control.total_shift == control.total_shift and again.gamma == pruner.gamma


def test_gamma_auto_needs_a_budget_and_is_catalysts():
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="budget_steps"):
        cf.Pruner(model, (1, 8, 8), gamma="auto")
    with pytest.raises(ValueError, match="method 'slimming' needs a number"):
        cf.Pruner(model, (1, 8, 8), method="slimming", gamma="auto", budget_steps=10)
    with pytest.raises(ValueError, match="budget_steps must be a positive integer"):
        cf.Pruner(model, (1, 8, 8), budget_steps=0)
    pruner = cf.Pruner(model, (1, 8, 8), gamma="auto", budget_steps=1000)
    with pytest.raises(ValueError, match="not resolved"):
        pruner.regularize()
    pred = pruner.predictions(lr=0.01, momentum=0.9, weight_decay=0.0)
    assert pred["gamma"] is None and pred["k"]["max"] < 2
    pruner.resolve_gamma(lr=0.01, momentum=0.9)
    pred = pruner.predictions(lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert pred["steps_to_decide_offset"]["steps"] == pytest.approx(500, rel=1e-6)  # half the budget
    assert pred["force_step"] == 800 and pred["warnings"] == []
    # a budget of 100 steps needs a rate at which the prune side barely reaches kappa = 1: said so
    short = cf.Pruner(model, (1, 8, 8), gamma="auto", budget_steps=100)
    short.resolve_gamma(lr=0.01, momentum=0.9)
    assert any("kappa 1.0 is within half a decade" in w for w in short.predictions(0.01, 0.9, 0.0)["warnings"])


def _net_with_dead_channels(consumer: str):
    """conv - BN - ReLU - consumer, with BN scale 0 on channels 0-2 (they output relu(beta), beta > 0)."""
    torch.manual_seed(0)
    head = nn.Conv2d(6, 4, 1) if consumer == "conv1x1" else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), head)
    if consumer == "conv1x1":
        model.append(nn.Flatten())
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 2, 5, 5))
        model[1].weight[:3] = 0
        model[1].bias[:3] = torch.tensor([0.5, 1.0, -0.3])
    return model.eval()


@pytest.mark.parametrize("consumer", ["linear", "conv1x1"])
def test_removed_channels_constant_output_is_folded_into_the_consumer(consumer):
    """BN mode without the shift (--bn-gamma-only): a channel with scale 0 still feeds relu(beta) to its consumer;
    removing it folds that constant into the consumer's bias, so the removal is exact."""
    model = _net_with_dead_channels(consumer)
    x = torch.randn(8, 2, 5, 5)
    with torch.no_grad():
        before = model(x)
    pruner = cf.Pruner(model, (2, 5, 5), mode="bn", bn_beta=False, gamma=0.1)
    assert pruner.folds_constants
    summary = pruner.prune({"0": [3, 4, 5]})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert len(summary.folded) == 1 and next(iter(summary.folded.values()))["max_bias_change"] > 0
    # the same removal without the fold loses the constants (and a rebuilt pruner replays the created bias)
    plain = _net_with_dead_channels(consumer)
    cf.Pruner(plain, (2, 5, 5), mode="bn", bn_beta=False, gamma=0.1).prune({"0": [3, 4, 5]}, folds={})
    with torch.no_grad():
        assert float((plain.eval()(x) - before).abs().max()) > 1e-2
    fresh = _net_with_dead_channels(consumer)
    again = cf.Pruner(fresh, (2, 5, 5), mode="bn", bn_beta=False, gamma=0.1)
    again.load_state_dict(pruner.state_dict())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), before, rtol=1e-5, atol=1e-5)
    # group mode regularises the shift too: nothing to fold
    assert not cf.Pruner(_net_with_dead_channels(consumer), (2, 5, 5), mode="group", gamma=0.1).folds_constants


def test_recalibrate_bn_reestimates_the_statistics_from_the_given_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 3))
    x = torch.randn(96, 1, 8, 8)
    loader = [(x[i * 32:(i + 1) * 32], torch.zeros(32, dtype=torch.long)) for i in range(3)]
    model.eval()
    bn = model[1]
    momentum = bn.momentum
    rng = torch.get_rng_state()
    assert recalibrate_bn(model, loader, batches=2) == 64
    assert torch.equal(torch.get_rng_state(), rng)  # dropout stayed off: no random draw
    assert not model.training and not bn.training and bn.momentum == momentum
    with torch.no_grad():  # the cumulative average over exactly the first two batches
        feats = [model[0](x[i * 32:(i + 1) * 32]) for i in range(2)]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert recalibrate_bn(nn.Linear(2, 2), loader, batches=1) == 0
    with pytest.raises(ValueError, match="batches must be a positive integer"):
        recalibrate_bn(model, loader, batches=0)
    stats = bn.running_mean.clone()
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_bn(model, [], batches=1)
    assert torch.equal(bn.running_mean, stats)  # kept


def test_stale_batchnorm_statistics_understate_a_shrunk_networks_accuracy(tiny_config, quiet):
    """The workflow reports accuracies with re-estimated statistics (and says so); with them off, a network whose
    weights shrank fast in opt1 is scored with stale statistics."""
    from catalyst_fused.pruning import run_pipeline

    # without the prune side's pull: with it, the tiny run's channels (all started on the prune side) are set to
    # zero, and a network reduced to one channel per layer scores the same either way
    on = run_pipeline(tiny_config("on", dense_epochs=6, epochs=2, finetune_epochs=0, prune_pull=False), log=quiet)
    off = run_pipeline(tiny_config("off", dense_epochs=6, epochs=2, finetune_epochs=0, bn_recalibration_batches=0,
                                   prune_pull=False), log=quiet)
    assert "re-estimated on 8 training batches" in on.evaluation and "running" in off.evaluation
    # identical training (statistics do not enter train-mode steps), different measurement
    assert [h["train_loss"] for h in on.history] == [h["train_loss"] for h in off.history]
    assert on.accuracy.regularized > off.accuracy.regularized


def test_random_pruning_is_seeded_and_reaches_its_target():
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    torch.manual_seed(3)
    a = cf.Pruner(model, (1, 8, 8), method="random", gamma=0.0, target_speedup=2.0)
    torch.manual_seed(3)
    b = cf.Pruner(build_model("small_cnn", num_classes=10, in_channels=1), (1, 8, 8), method="random", gamma=0.0,
                  target_speedup=2.0)
    assert all(torch.equal(x, y) for x, y in zip(a.scores(), b.scores()))
    assert a.regularize() is None and not a.all_decided()
    summary = a.prune()
    assert summary.flops_ratio >= 2.0 and summary.channels_pruned > 0
    assert [len(s) for s in a.scores()] == [t.channels for t in a.targets]


def test_a_restored_pruner_keeps_the_pace_of_the_run_it_continues():
    """settle_steps and the pull's pace come from the k of the run's start; a resumed run builds its pruner on
    later weights, so the state carries that k (without it, a resumed run emptied its groups at other steps)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    pruner = cf.Pruner(model, (1, 8, 8), gamma=0.1)
    pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.005, momentum=0.9)))
    pace = (pruner.settle_steps(), pruner.pull_settings())
    state = pruner.state_dict()
    with torch.no_grad():  # the weights of a later epoch: another k
        model.conv2.weight[:, :16] *= 0.1
    again = cf.Pruner(model, (1, 8, 8), gamma=0.1)
    again.attach_optimizer(torch.optim.SGD(again.param_groups(0.005, momentum=0.9)))
    assert again.settle_steps() != pace[0]
    again.load_state_dict(state)
    assert (again.settle_steps(), again.pull_settings()) == pace


def test_prune_pull_must_be_a_bool():
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    with pytest.raises(TypeError, match="prune_pull must be True or False, got 'no'"):
        cf.Pruner(model, (1, 8, 8), prune_pull="no")
