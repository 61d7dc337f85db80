"""The public pruner object (catalyst_fused.Pruner) on models and loops the library does not know."""
import copy
import warnings

import pytest
import torch
from torch import nn

import catalyst_fused as cf
from catalyst_fused.pruning import mask_model


class UserNet(nn.Module):
    """A model written by a user: a residual block, a 1x1 shortcut, a hidden linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(12)
        self.conv_b = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(x + self.bn_b(self.conv_b(y)))
        x = x.mean(dim=(2, 3))
        return self.head(torch.relu(self.hidden(x)))


def _warm(model, shape=(3, 8, 8)):
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *shape))
    return model


def _steps(model, pruner, optimizer, n=3, shape=(3, 8, 8), classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    loss = None
    for _ in range(n):
        x, y = torch.randn(8, *shape, generator=gen), torch.randint(0, classes, (8,), generator=gen)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        pruner.regularize()
        optimizer.step()
        pruner.after_step()
    return loss


def test_a_user_model_prunes_through_the_public_object():
    torch.manual_seed(0)
    model = _warm(UserNet())
    pruner = cf.Pruner(model, torch.randn(2, 3, 8, 8), gamma=0.05, c0=1.0, ignored_layers=[model.head])
    assert [t.name for t in pruner.targets] == ["stem", "conv_a", "hidden"]  # stem+conv_b coupled by the residual add
    optimizer = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9, weight_decay=5e-4))
    pruner.attach_optimizer(optimizer)
    # the pruner's parameter groups: weights with weight decay, catalysts without, same momentum
    weights_group, catalyst_group = optimizer.param_groups
    assert catalyst_group["weight_decay"] == 0.0 and catalyst_group["momentum"] == 0.9 and weights_group["weight_decay"] == 5e-4
    assert {id(p) for p in catalyst_group["params"]} == {id(d) for d in pruner.catalysts}
    loss = _steps(model, pruner, optimizer)
    assert not pruner.all_decided()
    stats = pruner.stats()
    assert stats.channels == 8 + 12 + 16 and [t.name for t in stats.targets] == ["stem", "conv_a", "hidden"]
    assert 0 <= stats.fraction_decided <= 1

    model.eval()
    x = torch.randn(4, 3, 8, 8)
    keep = {"stem": [0, 2, 3, 7], "conv_a": torch.arange(12) % 3 != 0, "hidden": list(range(10))}
    with torch.no_grad():
        expected = mask_model(model, pruner.targets, keep)(x)
    momentum_before = optimizer.state[model.conv_a.weight]["momentum_buffer"].clone()
    summary = pruner.prune(keep)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    # narrower modules (same module objects), narrower catalysts, renumbered targets
    assert (model.stem.out_channels, model.conv_b.out_channels, model.bn0.num_features) == (4, 4, 4)
    assert (model.conv_a.in_channels, model.conv_a.out_channels, model.conv_b.in_channels) == (4, 8, 8)
    assert (model.hidden.out_features, model.head.in_features) == (10, 10)
    assert [t.channels for t in pruner.targets] == [4, 8, 10] and [d.numel() for d in pruner.catalysts] == [4, 8, 10]
    assert summary.channels_pruned == 4 + 4 + 6 and summary.flops_ratio > 1 and summary.params_ratio > 1
    # the optimizer follows: new parameters in its groups, momentum narrowed like the weight
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} | {id(d) for d in pruner.catalysts} == held
    rows = torch.nonzero(torch.arange(12) % 3 != 0).flatten()
    torch.testing.assert_close(optimizer.state[model.conv_a.weight]["momentum_buffer"],
                               momentum_before[rows][:, torch.tensor([0, 2, 3, 7])])
    # training goes on (with the last step's loss and graph still alive) and prunes again
    del loss
    loss = _steps(model, pruner, optimizer, seed=1)
    assert torch.isfinite(loss)
    again = pruner.prune({"conv_a": [0, 1]})
    assert again.channels_pruned == 6 and model.conv_a.out_channels == 2 and len(pruner.history) == 2


def test_training_continues_while_an_old_graph_is_alive():
    """A ``loss`` of the last step in scope keeps autograd's gradient accumulators: the pruned layers must
    still train (new parameters, not a resized old leaf)."""
    model = _warm(UserNet())
    pruner = cf.Pruner(model, (3, 8, 8), gamma=0.01)
    optimizer = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(lr=0.01)))
    loss = _steps(model, pruner, optimizer, n=1)
    pruner.prune({"hidden": [1, 2, 3]})
    before = model.hidden.weight.detach().clone()
    _steps(model, pruner, optimizer, n=1)
    assert loss.grad_fn is not None and not torch.equal(before, model.hidden.weight)


@pytest.mark.parametrize("bad,message", [
    ({"stem": [0.0, 1.0]}, "integers"),
    ({"stem": [0, 0, 1]}, "duplicates"),
    ({"stem": [True, False]}, "one entry per channel"),
    ({"stem": []}, "no channel"),
    ({"stem": [0, 8]}, "out of range"),
    ({"bn0": [0]}, "not targets"),
])
def test_keep_sets_are_validated(bad, message):
    model = UserNet()
    pruner = cf.Pruner(model, (3, 8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        pruner.prune(bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_bool_masks_and_indices_prune_alike():
    torch.manual_seed(0)
    a, b = UserNet(), None
    b = copy.deepcopy(a)
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no optimizer: nothing to follow the removal
        cf.Pruner(a, (3, 8, 8)).prune({"stem": mask})
        cf.Pruner(b, (3, 8, 8)).prune({"stem": [0, 2, 3, 6]})
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_state_dict_rebuilds_the_pruned_model_on_a_fresh_one():
    torch.manual_seed(0)
    model = _warm(UserNet())
    pruner = cf.Pruner(model, (3, 8, 8), gamma=0.05)
    optimizer = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9)))
    _steps(model, pruner, optimizer)
    pruner.prune({"conv_a": [1, 4, 5], "hidden": [0, 3]})
    _steps(model, pruner, optimizer, seed=2)
    saved_pruner, saved_model = pruner.state_dict(), model.state_dict()
    fresh = UserNet()
    restored = cf.Pruner(fresh, (3, 8, 8), gamma=0.05)
    restored.load_state_dict(saved_pruner)
    fresh.load_state_dict(saved_model)
    assert [t.channels for t in restored.targets] == [t.channels for t in pruner.targets]
    for d, e in zip(restored.catalysts, pruner.catalysts):
        assert torch.equal(d, e)
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    with pytest.raises(ValueError, match="method"):
        cf.Pruner(UserNet(), (3, 8, 8), method="group_lasso").load_state_dict(saved_pruner)
    with pytest.raises(ValueError, match="not a pruner state"):
        cf.Pruner(UserNet(), (3, 8, 8)).load_state_dict({"catalysts": []})


def test_attach_optimizer_adds_the_catalyst_group_and_refuses_weight_decay_on_it():
    model = UserNet()
    pruner = cf.Pruner(model, (3, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    pruner.attach_optimizer(optimizer)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[1]["momentum"] == 0.9  # the optimizer's defaults: the weights' momentum
    bad = torch.optim.SGD([*model.parameters(), *pruner.catalysts], lr=0.1, weight_decay=1e-4)
    with pytest.raises(ValueError, match="weight decay"):
        pruner.attach_optimizer(bad)
    with pytest.raises(ValueError, match="some of the pruner's catalysts"):
        pruner.attach_optimizer(torch.optim.SGD([pruner.catalysts[0]], lr=0.1))


def test_prune_without_a_known_optimizer_warns():
    pruner = cf.Pruner(UserNet(), (3, 8, 8))
    with pytest.warns(UserWarning, match="no optimizer is attached"):
        pruner.prune({"hidden": [0]})


def test_ignored_layers_are_excluded_with_a_reason():
    model = UserNet()
    pruner = cf.Pruner(model, (3, 8, 8), ignored_layers=[model.conv_b, "hidden"])
    assert [t.name for t in pruner.targets] == ["conv_a"]
    reasons = [e["reason"] for e in pruner.excluded]
    assert any("ignored_layers: conv_b" in r for r in reasons) and any("ignored_layers: hidden" in r for r in reasons)
    with pytest.raises(ValueError, match="ignored_layers\\[0\\]"):
        cf.Pruner(model, (3, 8, 8), ignored_layers=[nn.Linear(2, 2)])


def test_regularize_is_the_fused_penalty_and_follows_the_grad_scaler():
    torch.manual_seed(0)
    model = UserNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    pruner = cf.Pruner(model, (3, 8, 8), gamma=0.3, grad_scaler=scaler)
    ts = pruner.target_set
    stats = pruner.regularize()
    grads = [w.grad.clone() for w in ts.weights]
    ref_w = [w.detach().clone().requires_grad_(True) for w in ts.weights]
    ref_d = [d.detach().clone().requires_grad_(True) for d in pruner.catalysts]
    (0.3 * 128.0 * cf.reference.penalty(ref_w, ref_d, ts.layout)).backward()
    for g, r in zip(grads, ref_w):
        torch.testing.assert_close(g, r.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.penalty, cf.reference.penalty(ref_w, ref_d, ts.layout).detach(), rtol=1e-5, atol=0)


def test_frozen_weights_get_no_penalty_gradient():
    # A frozen weight must not get a .grad from the penalty (the optimizer would then update it).
    model = UserNet()
    model.hidden.weight.requires_grad_(False)
    pruner = cf.Pruner(model, (3, 8, 8))
    pruner.regularize()
    assert model.hidden.weight.grad is None
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0
    assert all(d.grad is not None for d in pruner.catalysts)


def test_baselines_have_no_stop_rule_and_lats_needs_a_learning_rate():
    model = _warm(UserNet())
    lats = cf.Pruner(model, (3, 8, 8), method="lats_channel", gamma=0.1)
    assert lats.regularize() is None and not lats.all_decided()
    with pytest.raises(ValueError, match="learning rate"):
        lats.after_step()
    before = model.hidden.weight.detach().abs().sum()
    lats.after_step(lr=0.1)
    assert model.hidden.weight.detach().abs().sum() < before and lats.method.threshold == pytest.approx(0.01)
    gl = cf.Pruner(UserNet(), (3, 8, 8), method="group_lasso", target_speedup=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no optimizer to follow the removal
        summary = gl.prune()
    assert summary.flops_ratio >= 1.5 and not gl.all_decided()


def test_bypass_formulation_attaches_in_place_and_folds_to_a_plain_narrower_model():
    from catalyst_fused.pruning import bypass
    from catalyst_fused.models import build_model

    torch.manual_seed(0)
    model = _warm(build_model("small_cnn"), (1, 8, 8))
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y0 = model(x)
    pruner = cf.Pruner(model, (1, 8, 8), formulation="bypass", c0=1.3)
    assert bypass.is_wrapped(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)  # the extended model starts as the original
    optimizer = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(lr=0.01, momentum=0.9)))
    assert len(optimizer.param_groups[1]["params"]) == 2 * len(pruner.targets)  # d and dbar, no weight decay
    _steps(model, pruner, optimizer, shape=(1, 8, 8), classes=10)
    pruner.prune({"conv2": list(range(0, 64, 2))})
    assert bypass.wrappers(model)[1][1].d.numel() == 32 and pruner.catalysts[1].numel() == 32
    residual = pruner.fold()
    assert residual >= 0 and not bypass.is_wrapped(model) and model.conv2.out_channels == 32
    with pytest.raises(ValueError, match="only for formulation='bypass'"):
        cf.Pruner(build_model("small_cnn"), (1, 8, 8)).fold()


def test_bad_arguments_name_themselves():
    model = UserNet()
    with pytest.raises(ValueError, match="gamma"):
        cf.Pruner(model, (3, 8, 8), gamma=float("nan"))
    with pytest.raises(ValueError, match="c0"):
        cf.Pruner(model, (3, 8, 8), c0=0)
    with pytest.raises(ValueError, match="mode"):
        cf.Pruner(model, (3, 8, 8), mode="rows")
    with pytest.raises(ValueError, match="--method"):
        cf.Pruner(model, (3, 8, 8), method="random")
    with pytest.raises(ValueError, match="example_inputs"):
        cf.Pruner(model, "3x8x8")
    with pytest.raises(TypeError, match="nn.Module"):
        cf.Pruner("model", (3, 8, 8))
