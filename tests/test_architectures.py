"""Targets and removal for the structures of efficient CNNs and transformers (issue 12): depthwise and grouped
convolutions, flattened maps read by a linear (column blocks), MLPs on token tensors with LayerNorm entries,
attention heads (``nn.MultiheadAttention`` and, when ``transformers`` is installed, a grouped-query Llama).

Every case checks the removal against the masked model (``pruned == masked``) and the group layout the
target set builds against the fp64 reference penalty."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import catalyst_fused as cf
from catalyst_fused.models import build_model
from catalyst_fused.pruning import build_target_set, find_targets, mask_model, prune_model
from catalyst_fused.pruning.attention import PrunedMultiheadAttention
from tests._helpers import check_against_reference, random_catalysts


def _half(targets, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {t.name: torch.randperm(t.channels, generator=gen)[: max(1, t.channels // 2)].sort().values.tolist()
            for t in targets}


def _randomize_bn(model: nn.Module) -> None:
    """BN statistics away from 0/1, so that a removed channel's BN output would show in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _assert_pruned_equals_masked(model, targets, keep, x, tol=1e-5):
    model.eval()
    pruned, masked = prune_model(model, targets, keep).eval(), mask_model(model, targets, keep).eval()
    with torch.no_grad():
        want, got = masked(x), pruned(x)
    torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, float(want.abs().max())))
    return pruned


def _assert_layout_matches_reference(model, targets):
    """The group layout of ``targets`` (with its width column where a target has blocks) gives the
    reference's penalty and gradients on the C++ backend."""
    ts = build_target_set(model, "group", targets=targets)
    assert ts.layout is not None
    weights = [w.detach().double() for w in ts.weights]
    check_against_reference(weights, random_catalysts(weights, ts.layout), ts.layout, backend="cpp")
    return ts


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.dw_bn = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.q, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        y = self.dw_bn(self.dw(F.relu(self.bn(self.p(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.q(F.relu(y)), 1), 1))


def test_depthwise_convolution_is_one_group_with_its_producer_and_stays_depthwise():
    model = _Depthwise()
    _randomize_bn(model)
    targets = {t.name: t for t in find_targets(model, (3, 6, 6))}
    t = targets["p"]
    assert [p.module for p in t.channelwise] == ["dw"]
    assert sorted(b.module for b in t.bns) == ["bn", "dw_bn"]
    assert [c.module for c in t.consumers] == ["q"]
    keep = _half(targets.values())
    pruned = _assert_pruned_equals_masked(model, list(targets.values()), keep, torch.randn(2, 3, 6, 6))
    n = len(keep["p"])
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == n
    assert pruned.dw.weight.shape == (n, 1, 3, 3) and pruned.q.in_channels == n
    _assert_layout_matches_reference(model, list(targets.values()))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.g(F.relu(self.bn(self.p(x)))), 1), 1))


def test_grouped_convolution_removes_the_same_positions_in_every_group():
    model = _Grouped()
    _randomize_bn(model)
    targets = {t.name: t for t in find_targets(model, (3, 6, 6))}
    t = targets["p"]
    assert t.channels == 4  # 8 input channels of g in 2 groups: a channel is one position in both groups
    assert sorted((p.start, p.count, p.offset) for p in t.producers) == [(0, 4, 0), (4, 4, 0)]
    assert [(c.module, c.start, c.count) for c in t.consumers] == [("g", 0, 4)]
    assert targets["g"].channels == 3  # g's own 6 outputs: 3 per group
    keep = {"p": [1, 3], "g": [0, 2]}
    pruned = _assert_pruned_equals_masked(model, list(targets.values()), keep, torch.randn(2, 3, 6, 6))
    assert pruned.g.groups == 2 and pruned.g.in_channels == 4 and pruned.g.out_channels == 4
    assert pruned.p.out_channels == 4 and pruned.fc.in_features == 4
    _assert_layout_matches_reference(model, list(targets.values()))


class _FlattenMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.hidden, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4 * 2 * 2, 6), nn.Linear(6, 2)

    def forward(self, x):  # channel i of p is the 4 consecutive columns 4i..4i+3 of hidden
        return self.fc(F.relu(self.hidden(torch.flatten(F.adaptive_avg_pool2d(self.p(x), 2), 1))))


def test_flattened_map_feeds_a_linear_in_column_blocks():
    model = _FlattenMap()
    targets = {t.name: t for t in find_targets(model, (3, 4, 4))}
    (hidden,) = targets["p"].consumers
    assert (hidden.module, hidden.start, hidden.count, hidden.width) == ("hidden", 0, 16, 4)
    keep = {"p": [0, 2], "hidden": [1, 2, 5]}
    pruned = _assert_pruned_equals_masked(model, list(targets.values()), keep, torch.randn(2, 3, 4, 4))
    assert pruned.hidden.in_features == 8
    torch.testing.assert_close(pruned.hidden.weight, model.hidden.weight[[1, 2, 5]][:, [0, 1, 2, 3, 8, 9, 10, 11]])
    _assert_layout_matches_reference(model, list(targets.values()))


class _Block(nn.Module):
    """A pre-norm transformer block on token tensors: attention and a GELU MLP, residual stream through
    LayerNorms."""

    def __init__(self, dim=16, heads=4, hidden=24):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.ln1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def test_transformer_block_mlp_heads_and_residual_stream():
    model = _Block()
    targets, excluded = find_targets(model, (7, 5), return_excluded=True)
    by_name = {t.name: t for t in targets}
    # MLP hidden neurons: fc1 rows + bias, fc2 input columns
    mlp = by_name["fc1"]
    assert [c.module for c in mlp.consumers] == ["fc2"] and mlp.channels == 24
    # attention heads: 4 blocks of 4 rows of q, k and v, and the matching out_proj columns
    (heads,) = [t for t in targets if t.attention == "attn"]
    assert heads.channels == 4 and heads.head_dim == 4
    # the residual stream: embed rows, both LayerNorms' entries, attention/fc1/head input columns
    stream = by_name["embed"]
    assert sorted(n.module for n in stream.norms) == ["ln1", "ln2"] and not stream.exact
    # asdict: the pruner's state_dict stores targets as dicts
    assert all(isinstance(dataclasses.asdict(t), dict) for t in targets)
    keep = _half(targets)
    pruned = _assert_pruned_equals_masked(model, targets, keep, torch.randn(2, 7, 5))
    assert pruned.attn.num_heads == 2 and pruned.fc1.out_features == 12 and pruned.embed.out_features == 8
    _assert_layout_matches_reference(model, targets)


def test_torchvision_vit_prunes_heads_mlps_and_width_through_the_pruner():
    torch.manual_seed(0)
    model = build_model("vit_cifar", num_classes=10, in_channels=1, image_size=8)
    pruner = cf.Pruner(model, (1, 8, 8), method="catalyst", mode="group")
    kinds = {"heads": sum(1 for t in pruner.targets if t.attention), "norms": sum(1 for t in pruner.targets if t.norms)}
    assert kinds["heads"] == 4 and kinds["norms"] == 1  # one head group per layer, one residual stream
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(lr=0.01, momentum=0.9)))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.regularize()
        opt.step()
        pruner.after_step()
    keep = _half(pruner.targets, seed=3)
    model.eval()
    masked = mask_model(model, pruner.targets, keep).eval()
    before = sum(p.numel() for p in model.parameters())
    pruner.prune(keep=keep, optimizer=opt)
    assert sum(p.numel() for p in model.parameters()) < before
    model.eval()
    with torch.no_grad():
        want = masked(x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))
    attn = model.encoder.layers[0].self_attention
    assert attn.num_heads == 2 and model.hidden_dim == model.conv_proj.out_channels
    # training continues on the narrowed parameters
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pruner.regularize()
    opt.step()
    # the removal replays on a fresh model from the pruner's state
    fresh = build_model("vit_cifar", num_classes=10, in_channels=1, image_size=8)
    again = cf.Pruner(fresh, (1, 8, 8), method="catalyst", mode="group")
    again.load_state_dict(pruner.state_dict())
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_mobilenetv2_every_group_prunes_like_the_mask():
    torch.manual_seed(0)
    model = build_model("mobilenetv2_cifar", num_classes=10, in_channels=1)
    _randomize_bn(model)
    targets, excluded = find_targets(model, (1, 16, 16), return_excluded=True)
    assert all(e["reason"].startswith("its channels are a model output") for e in excluded), excluded
    depthwise = {p.module for t in targets for p in t.channelwise}
    assert len(depthwise) == 7  # every block's depthwise convolution
    pruned = _assert_pruned_equals_masked(model, targets, _half(targets), torch.randn(2, 1, 16, 16))
    assert all(m.groups == m.in_channels == m.out_channels for m in pruned.modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1)


def test_multihead_attention_with_unequal_value_width_becomes_a_pruned_module():
    """Removing heads of an ``nn.MultiheadAttention`` narrows q/k/v below the embedding width: the module
    is swapped for ``PrunedMultiheadAttention``, which runs the same computation."""
    model = _Block(dim=8, heads=2, hidden=8)
    targets = find_targets(model, (3, 5))
    (heads,) = [t for t in targets if t.attention]
    pruned = _assert_pruned_equals_masked(model, targets, {heads.name: [1]}, torch.randn(2, 3, 5))
    assert isinstance(pruned.attn, PrunedMultiheadAttention) and pruned.attn.num_heads == 1


def _tiny_llama():
    T = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


def test_llama_gqa_heads_gated_mlp_and_rms_norms():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 6))
    example = {"input_ids": ids, "use_cache": False}
    targets, excluded = find_targets(model, example, return_excluded=True)
    (heads,) = [t for t in targets if t.attention]
    assert heads.channels == 2 and heads.head_dim == 8  # a key/value head with its 2 query heads
    q = next(p for p in heads.producers if p.module.endswith("q_proj"))
    assert (q.count, q.width) == (32, 16)  # 2 query heads of 8 rows per key/value head
    mlp = next(t for t in targets if t.name.endswith("gate_proj"))
    assert {p.module.rsplit(".", 1)[1] for p in mlp.producers} == {"gate_proj", "up_proj"}
    assert [c.module.rsplit(".", 1)[1] for c in mlp.consumers] == ["down_proj"]
    keep = {heads.name: [1], **{t.name: list(range(0, t.channels, 2)) for t in targets if not t.attention}}
    pruned = prune_model(model, targets, keep).eval()
    masked = mask_model(model, targets, keep).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 6)), "use_cache": False}
    with torch.no_grad():
        want, got = masked(**x).logits, pruned(**x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8
    _assert_layout_matches_reference(model, targets)


def _tiny_bert():
    T = pytest.importorskip("transformers")
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=32, num_labels=3)
    return T.BertForSequenceClassification(cfg).eval(), "bert.encoder.layer.0.attention.self"


def _tiny_timm_vit():
    vt = pytest.importorskip("timm.models.vision_transformer")
    model = vt.VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=4, num_classes=3)
    return model.eval(), "blocks.0.attn"


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_timm_vit], ids=["hf_bert", "timm_vit"])
def test_bert_and_timm_attention_heads_prune_like_the_mask(make):
    torch.manual_seed(0)
    model, site = make()
    if make is _tiny_bert:
        example, x = {"input_ids": torch.randint(0, 64, (1, 6))}, {"input_ids": torch.randint(0, 64, (2, 6))}
        run = lambda m: m(**x).logits  # noqa: E731
    else:
        example, x = torch.randn(1, 1, 8, 8), torch.randn(2, 1, 8, 8)
        run = lambda m: m(x)  # noqa: E731
    targets = find_targets(model, example)
    (heads,) = [t for t in targets if t.attention == site]
    assert heads.channels == 4 and heads.head_dim == 8
    keep = {heads.name: [0, 3], **{t.name: list(range(0, t.channels, 2)) for t in targets if not t.attention}}
    pruned, masked = prune_model(model, targets, keep).eval(), mask_model(model, targets, keep).eval()
    with torch.no_grad():
        want, got = run(masked), run(pruned)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
