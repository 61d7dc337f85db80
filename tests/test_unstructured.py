"""Unstructured pruning to a target sparsity (LATS, magnitude) through cf.Pruner, and its workflow path."""
import copy
import math

import pytest
import torch
from torch import nn

import catalyst_fused as cf
from catalyst_fused import reference_sparsity as ref
from catalyst_fused.pruning import PruneConfig, run_pipeline
from catalyst_fused.pruning.unstructured import SparsityPruner, choose_tensors, schedule_progress, sparse_macs

from _helpers import assert_resumed_run_equals_straight_run


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)  # registered first, runs last: the order comes from the forward pass
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.hidden = nn.Linear(16, 16)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.hidden(x)))


def _loop(model, pruner, optimizer, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.regularize()
        optimizer.step()
        pruner.after_step()


def _lats(model, **kw):
    args = dict(method="lats", sparsity=0.8, total_steps=12, steps_per_epoch=4)
    args.update(kw)
    return cf.Pruner(model, (3, 6, 6), **args)


# ------------------------------------------------------------------------------------------ schedules
def test_lats_schedule_is_the_cumulative_learning_rate_of_a_per_epoch_cosine():
    epochs, per = 5, 7
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = []
    for _ in range(epochs):
        lrs += [opt.param_groups[0]["lr"]] * per
        opt.step()  # no gradients: nothing moves (and the scheduler sees the usual order)
        sched.step()
    cumulative = [sum(lrs[:k]) for k in range(len(lrs) + 1)]
    for k in range(len(lrs) + 1):  # lam constant: t_k / T = cumulative lr / total lr
        assert schedule_progress("lats", k, epochs * per, per) == pytest.approx(cumulative[k] / cumulative[-1], abs=1e-12)


def test_slats_and_continuation_schedules():
    n = 1000
    xs = [k / n for k in range(n + 1)]
    slats = [schedule_progress("slats", k, n) for k in range(n + 1)]
    assert slats[0] == 0 and slats[-1] == 1 and all(b >= a for a, b in zip(slats, slats[1:]))
    assert slats[250] == pytest.approx(0.25 + math.sin(math.pi / 4) / math.pi)
    assert schedule_progress("continuation", 250, n, beta=1.0) == pytest.approx(slats[250])
    for beta in (0.5, 10.0):  # the closed form against the integral of lam(x) * lr(x) = beta^x (1 + cos(pi x))
        dense = [beta ** x * (1 + math.cos(math.pi * x)) for x in xs]
        trapezoid = [0.0]
        for a, b in zip(dense, dense[1:]):
            trapezoid.append(trapezoid[-1] + (a + b) / (2 * n))
        for k in (100, 500, 900):
            assert schedule_progress("continuation", k, n, beta=beta) == pytest.approx(trapezoid[k] / trapezoid[-1], abs=1e-5)
    # growing lam holds the threshold back early on
    assert schedule_progress("continuation", 300, n, beta=10.0) < slats[300]
    assert schedule_progress("lats", n + 5, n) == 1.0


# ------------------------------------------------------------------------------------------ which tensors
def test_tensors_follow_the_forward_order_first_and_classifier_optional():
    model = Net()
    targets, excluded = choose_tensors(model, (3, 6, 6))
    assert [t.name for t in targets] == ["conv.weight", "hidden.weight"]
    assert {e["producers"][0] for e in excluded} == {"stem", "head"}
    targets, _ = choose_tensors(model, (3, 6, 6), include_first=True, include_classifier=True, ignored_layers=[model.hidden])
    assert [t.name for t in targets] == ["stem.weight", "conv.weight", "head.weight"]
    targets, _ = choose_tensors(model, layers=["head", model.stem])
    assert [t.name for t in targets] == ["head.weight", "stem.weight"]
    with pytest.raises(ValueError, match=r"layers\[0\]: bn is not a Conv or Linear module"):
        choose_tensors(model, layers=["bn"])


# ------------------------------------------------------------------------------------------ LATS
def test_lats_step_is_straight_through_on_theta_and_w_is_its_soft_threshold():
    torch.manual_seed(0)
    model = Net()
    pruner = _lats(model)
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.1, momentum=0.9, weight_decay=1e-3)))
    _loop(model, pruner, opt, 3)
    theta = [t.clone() for t in pruner.theta]
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in pruner.params]  # computed at w
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in pruner.params]
    pruner.regularize()
    opt.step()
    pruner.after_step()
    for th, g, b, new in zip(theta, grads, bufs, pruner.theta):  # SGD on theta (decay on theta) with w's gradient
        step = 0.9 * b + g + 1e-3 * th
        torch.testing.assert_close(new, th - 0.1 * step, rtol=0, atol=1e-7)
    t = pruner.final_threshold[0] * schedule_progress("lats", 4, 12, 4)
    assert pruner.thresholds == [pytest.approx(t)] * 2
    for p, th in zip(pruner.params, pruner.theta):
        assert torch.equal(p.detach(), ref.soft_threshold(th, pruner.thresholds[0]))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_lats_reaches_the_target_at_the_last_step_and_prune_fixes_the_masks(scope):
    torch.manual_seed(0)
    model = Net()
    pruner = _lats(model, scope=scope)
    opt = pruner.attach_optimizer(torch.optim.SGD(pruner.param_groups(0.05, momentum=0.9)))
    _loop(model, pruner, opt, 11)
    assert not pruner.all_decided() and pruner.stats().sparsity < 0.8
    _loop(model, pruner, opt, 1, seed=1)
    assert pruner.all_decided()
    st = pruner.stats()
    n = st.elements
    assert abs(st.zeros - round(0.8 * n)) <= 1
    if scope == "layer":
        for t in pruner.targets:
            assert abs(st.per_target[t.name]["zeros"] - round(0.8 * t.numel)) <= 1
    assert [h["why"] for h in pruner.threshold_history] == ["start", "epoch boundary", "epoch boundary", "last step"]
    x = torch.randn(4, 3, 6, 6)
    model.eval()
    before = model(x)
    summary = pruner.prune()
    assert summary.abs_error_points < 1 and pruner.theta is None
    assert torch.equal(model(x), before)  # w was S_T(theta) already
    masks = pruner.masks()
    model.train()
    _loop(model, pruner, opt, 3, seed=2)  # fine-tuning keeps the masks
    for p, t in zip(pruner.params, pruner.targets):
        assert torch.equal(p.detach() != 0, masks[t.name])


def test_lats_state_dict_resumes_exactly():
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    pa = _lats(a)
    oa = pa.attach_optimizer(torch.optim.SGD(pa.param_groups(0.05, momentum=0.9)))
    _loop(a, pa, oa, 5)
    # copies: state_dict()s hold the live tensors (a checkpoint writes them to disk at once)
    saved_model, saved_pruner, saved_opt = copy.deepcopy((a.state_dict(), pa.state_dict(), oa.state_dict()))
    _loop(a, pa, oa, 7, seed=3)
    pb = _lats(b)
    pb.load_state_dict(saved_pruner)
    b.load_state_dict(saved_model)
    ob = pb.attach_optimizer(torch.optim.SGD(pb.param_groups(0.05, momentum=0.9)))
    ob.load_state_dict(saved_opt)
    _loop(b, pb, ob, 7, seed=3)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert pa.thresholds == pb.thresholds and pb.steps == 12


def test_loop_misuse_and_bad_arguments_are_named():
    model = Net()
    with pytest.raises(ValueError, match="needs sparsity=.*now 'lats_channel'"):
        cf.Pruner(model, (3, 6, 6), method="lats")
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        cf.Pruner(model, (3, 6, 6), method="lats", sparsity=1.0, total_steps=3)
    with pytest.raises(ValueError, match="needs total_steps"):
        cf.Pruner(model, (3, 6, 6), method="lats", sparsity=0.5)
    with pytest.raises(ValueError, match="schedule and beta are LATS options"):
        cf.Pruner(model, (3, 6, 6), method="magnitude", sparsity=0.5, schedule="slats")
    with pytest.raises(ValueError, match="beta is the 'continuation' schedule's"):
        _lats(model, beta=3.0)
    with pytest.raises(TypeError, match="c0"):
        _lats(model, c0=1.0)  # Catalyst's options are not the unstructured pruner's
    pruner = _lats(model)
    with pytest.raises(RuntimeError, match="regularize\\(\\) was not called"):
        pruner.after_step()
    pruner.regularize()
    with pytest.raises(RuntimeError, match="called twice"):
        pruner.regularize()
    with pytest.raises(RuntimeError, match="between regularize\\(\\) and after_step\\(\\)"):
        pruner.prune()
    with pytest.raises(ValueError, match="keep= selects channels"):
        SparsityPruner(Net(), (3, 6, 6), method="magnitude", sparsity=0.5).prune(keep={})


def test_magnitude_prunes_once_to_the_target_and_keeps_its_masks():
    torch.manual_seed(0)
    model = Net()
    ws = [model.conv.weight.detach().clone(), model.hidden.weight.detach().clone()]
    pruner = cf.Pruner(model, (3, 6, 6), method="magnitude", sparsity=0.7)
    assert isinstance(pruner, SparsityPruner) and pruner.all_decided()
    flat = torch.cat([w.abs().flatten() for w in ws])
    k = round(0.7 * flat.numel())
    kept = flat > flat.kthvalue(k).values
    got = torch.cat([p.detach().flatten() for p in pruner.params])
    assert torch.equal(got != 0, kept) and torch.equal(got[kept], torch.cat([w.flatten() for w in ws])[kept])
    opt = torch.optim.SGD(pruner.param_groups(0.1))
    _loop(model, pruner, opt, 3)
    assert torch.equal(torch.cat([p.detach().flatten() for p in pruner.params]) != 0, kept)
    assert pruner.prune().zeros == k


def test_sparse_macs_counts_nonzero_weights():
    model = Net()
    with torch.no_grad():
        model.conv.weight.zero_()
    macs = sparse_macs(model, (3, 6, 6))
    assert macs["dense"] == 36 * (8 * 27 + 16 * 72) + 16 * 16 + 16 * 5
    assert macs["dense"] - macs["nonzero"] == 36 * 16 * 72


# ------------------------------------------------------------------------------------------ workflow
SPARSE_RUN = dict(method="lats", sparsity=0.8, dense_epochs=1, epochs=2, finetune_epochs=1)


def test_workflow_lats_reaches_the_target_saves_masks_and_resumes_exactly(tmp_path, tiny_config, quiet):
    straight = run_pipeline(tiny_config("straight", **SPARSE_RUN), log=quiet)
    assert straight.status == "done" and straight.method == "lats"
    masks = straight.stages.masks
    assert masks.within_one_point and abs(masks.sparsity - 0.8) < 1e-3
    assert masks.accuracy_before == masks.accuracy_after and masks.max_abs_logit_change == 0
    assert masks.sparsity_after_finetune == masks.sparsity and masks.nonzero_macs < masks.dense_macs
    assert straight.cost.flops_ratio == 1.0  # no channel removed
    assert [h["why"] for h in straight.stages.sparsify.threshold_history][-1] == "last step"
    saved = torch.load(tmp_path / "straight" / "sparse_model.pt", weights_only=True)
    for name, mask in saved["masks"].items():
        assert torch.equal(saved["state_dict"][name] != 0, mask)
    assert [t["name"] for t in saved["targets"]] == ["conv2.weight", "conv3.weight"]
    interrupted = run_pipeline(tiny_config("resumed", **SPARSE_RUN), stop_after_epochs=2, log=quiet)
    assert interrupted.status == "interrupted" and interrupted.stage == "sparsify"
    resumed = run_pipeline(tiny_config("resumed", **SPARSE_RUN), resume=True, log=quiet)
    assert_resumed_run_equals_straight_run(tmp_path / "straight", tmp_path / "resumed", straight, resumed)


def test_workflow_magnitude_from_the_same_dense_weights(tmp_path, tiny_config, quiet):
    report = run_pipeline(tiny_config("mag", method="magnitude", sparsity=0.9, sparsity_scope="layer", dense_epochs=1,
                                      epochs=1, finetune_epochs=1, sparsify_classifier=True), log=quiet)
    masks = report.stages.masks
    assert report.stages.sparsify.initial_sparsity == pytest.approx(0.9, abs=1e-3)
    assert all(abs(v["sparsity"] - 0.9) < 1e-2 for v in masks.per_tensor.values())
    assert "fc.weight" in masks.per_tensor and masks.sparsity_after_finetune == masks.sparsity


def test_config_validation_for_the_unstructured_methods():
    with pytest.raises(ValueError, match="--method lats needs --sparsity.*lats_channel"):
        PruneConfig(method="lats").validate()
    with pytest.raises(ValueError, match=r"--sparsity must be a number in \[0, 1\)"):
        PruneConfig(method="lats", sparsity=1.5).validate()
    with pytest.raises(ValueError, match="--sparsity is the target of the unstructured methods"):
        PruneConfig(method="catalyst", sparsity=0.5).validate()
    with pytest.raises(ValueError, match="--target-speedup is a channel-pruning target"):
        PruneConfig(method="magnitude", sparsity=0.5, target_speedup=2.0).validate()
    with pytest.raises(ValueError, match="--schedule: unknown schedule"):
        PruneConfig(method="lats", sparsity=0.5, schedule="cosine").validate()
    with pytest.raises(ValueError, match="--epochs must be >= 1 for --method lats"):
        PruneConfig(method="lats", sparsity=0.5, epochs=0).validate()


def test_cli_parses_the_unstructured_flags():
    from catalyst_fused.prune import build_parser, config_from_args

    args = build_parser().parse_args(["--method", "lats", "--sparsity", "0.9", "--sparsity-scope", "layer", "--schedule",
                                      "continuation", "--beta", "4", "--sparsify-first", "--sparsify-classifier"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.sparsity, cfg.sparsity_scope, cfg.schedule, cfg.beta) == ("lats", 0.9, "layer", "continuation", 4.0)
    assert cfg.sparsify_first and cfg.sparsify_classifier
    cfg.validate()


@pytest.mark.slow
def test_sparsity_experiment_smoke_setting(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = tmp_path / "results"
    command = [sys.executable, str(root / "experiments" / "sparsity_accuracy.py"), "--setting", "smoke", "--runs-dir",
               str(tmp_path / "runs"), "--results-dir", str(results)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    md = (results / "sparsity_accuracy_smoke.md").read_text()
    for method in ("lats", "slats", "magnitude"):
        assert f"| small_cnn | 90% | {method} |" in md
    assert "fine-tuning kept every mask (yes)" in md
    assert (results / "sparsity_accuracy_smoke.png").stat().st_size > 0
    data = json.loads((results / "sparsity_accuracy_smoke.json").read_text())
    assert len(data["records"]) == 6 and all(r["abs_error_points"] < 1 for r in data["records"])
    assert all(p["seeds"] == [0, 1] for p in data["points"])
