"""Coupled channel groups from Torch-Pruning's DependencyGraph: residual coupling, coverage, the group-mode
penalty, concatenation offsets, exclusions. CPU, small inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import catalyst_fused as cf
from catalyst_fused.models import build_model
from catalyst_fused.pruning import build_target_set, find_targets, mask_model, prune_model

SHAPES = {"small_cnn": (1, 8, 8), "resnet56": (3, 8, 8), "vgg19_bn": (3, 32, 32)}


def _names(pieces):
    return [p.module for p in pieces]


def test_resnet56_stage_one_residual_channels_are_one_group():
    targets = {t.name: t for t in find_targets(build_model("resnet56"), SHAPES["resnet56"])}
    t = targets["conv1"]
    blocks = [f"layer1.{k}" for k in range(9)]
    assert t.channels == 16
    assert _names(t.producers) == ["conv1"] + [f"{b}.conv2" for b in blocks]
    assert _names(t.bns) == ["bn1"] + [f"{b}.bn2" for b in blocks]
    assert _names(t.consumers) == [f"{b}.conv1" for b in blocks] + ["layer2.0.conv1", "layer2.0.shortcut.0"]
    assert all((p.start, p.count, p.offset) == (0, 16, 0) for p in t.producers + t.bns + t.consumers)
    # stage 2: the shortcut conv is a producer; stage 3 ends in the classifier's input columns
    assert "layer2.0.shortcut.0" in _names(targets["layer2.0.conv2"].producers)
    assert _names(targets["layer3.0.conv2"].consumers)[-1] == "fc"


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_layer_except_the_classifier_is_in_exactly_one_group(name):
    model = build_model(name)
    targets = find_targets(model, SHAPES[name])
    produced = [p.module for t in targets for p in t.producers]
    normalized = [b.module for t in targets for b in t.bns]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(dict(model.named_modules())[n], nn.Linear) or dict(model.named_modules())[n].groups == 1
               for n in layers)
    assert sorted(produced) == sorted(layers[:-1])  # each once; the last layer gives the logits
    assert sorted(normalized) == sorted(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))


def test_group_penalty_equals_a_hand_computed_reference():
    torch.manual_seed(0)
    model = build_model("resnet56")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ts = build_target_set(model, "group", input_shape=SHAPES["resnet56"])
    catalysts = [torch.randn(t.channels, dtype=torch.float64) for t in ts.targets]
    stats = cf.penalty([w.detach().double() for w in ts.weights], catalysts, layout=ts.layout, return_stats=True)
    modules = dict(model.named_modules())
    expected = torch.zeros((), dtype=torch.float64)
    for t, d in zip(ts.targets, catalysts):
        sq = torch.zeros(t.channels, dtype=torch.float64)
        for p in t.producers:  # output rows and bias entries
            sq += modules[p.module].weight.detach().double().flatten(1).pow(2).sum(1)
            assert modules[p.module].bias is None
        for b in t.bns:
            sq += modules[b.module].weight.detach().double() ** 2 + modules[b.module].bias.detach().double() ** 2
        for c in t.consumers:  # input columns
            w = modules[c.module].weight.detach().double()
            sq += w.transpose(0, 1).flatten(1).pow(2).sum(1)
        expected += (d.abs() * sq.sqrt()).sum()
        if t.name == "conv1":  # the stage-1 residual group: 10 producers, 10 BNs, 11 consumers
            seg = cf.split_per_weight(stats.norms, catalysts)[ts.segment_names.index("conv1")]
            torch.testing.assert_close(seg, sq.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.penalty, expected, rtol=1e-12, atol=0)


class _Concat(nn.Module):
    """a (4) and b (6) concatenated, plus d (10): d's rows are coupled to a's and b's."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.d = nn.Conv2d(3, 10, 1)
        self.c, self.bn_c = nn.Conv2d(10, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.e = nn.Conv2d(10, 3, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], 1)
        z = y + self.d(x)
        h = torch.cat([F.relu(self.bn_c(self.c(z))), self.e(z)], 1)  # c at columns 0-4, e at 5-7 of fc
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_concatenation_offsets_prune_like_the_mask():
    torch.manual_seed(0)
    model = _Concat().eval()
    targets = find_targets(model, (3, 6, 6))
    by_name = {t.name: t for t in targets}
    assert sorted(by_name) == ["a", "c", "e"]
    # d's 10 rows are added to [a, b]: one group whose members cover parts of it (b at offset 4)
    sum_group = by_name["a"]
    assert sum_group.channels == 10
    assert {(p.module, p.start, p.count, p.offset) for p in sum_group.producers} == {("a", 0, 4, 0), ("b", 0, 6, 4), ("d", 0, 10, 0)}
    assert {(p.module, p.offset) for p in sum_group.bns} == {("bn_a", 0), ("bn_b", 4)}
    # e's channels are columns 5-7 of fc
    assert [(p.module, p.start, p.count, p.offset) for p in by_name["e"].consumers] == [("fc", 5, 3, 0)]
    for mode in ("bn", "filter", "group"):
        build_target_set(model, mode, targets=targets)  # the layout accepts the offsets
    keep = {t.name: torch.randperm(t.channels)[: max(1, t.channels // 2)].tolist() for t in targets}
    pruned, masked = prune_model(model, targets, keep).eval(), mask_model(model, targets, keep).eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        y = masked(x)
        torch.testing.assert_close(pruned(x), y, rtol=0, atol=1e-5 * float(y.abs().max()))
    assert pruned.fc.in_features == len(keep["c"]) + len(keep["e"])


class _Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.q, self.r = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        u, v = torch.split(self.p(x), [4, 4], dim=1)  # sizes in the code: removal would break them
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.cat([self.q(u), self.r(v)], 1), 1), 1))


class _ChannelMultiplier(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.dw, self.q = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # each of p's channels is a whole group of dw: it goes only with its group
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.q(self.dw(self.p(x))), 1), 1))


class _ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.q, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        y = self.p(x)
        y = y * y.mean(1, keepdim=True)  # mixes channels: not a channel-wise operation
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.q(y), 1), 1))


@pytest.mark.parametrize("model,excluded,reason", [
    (_Split(), "p", "split"),
    (_ChannelMultiplier(), "p", "channel multiplier"),
    (_ChannelMean(), "p", "mean over the channels"),
])
def test_unmapped_structures_are_excluded_with_a_reason(model, excluded, reason):
    targets, dropped = find_targets(model, (3, 4, 4), return_excluded=True)
    assert excluded not in [p.module for t in targets for p in t.producers]
    match = [e for e in dropped if excluded in e["producers"]]
    assert len(match) == 1
    assert __import__("re").search(reason, match[0]["reason"]), match[0]["reason"]
    # what is left still prunes exactly like the mask
    keep = {t.name: [0] for t in targets}
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model, targets, keep)(x), mask_model(model, targets, keep)(x))


def test_find_targets_leaves_the_model_as_it_was():
    model = build_model("small_cnn").train()
    model.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # DepGraph needs autograd: find_targets turns it on for the trace
        targets = find_targets(model, (1, 8, 8))
    assert len(targets) == 3
    assert model.training and model.conv1.training and not model.bn1.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
