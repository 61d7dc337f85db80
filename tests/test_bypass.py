"""The bypass formulation (catalyst-method.md section 4b): the extended model psi(x) = D x - Dbar x + sigma(x),
its surgery, opt2 and fold, the pipeline with --formulation bypass, resume, and bad configurations.

CPU only, small models, a few epochs on subsets of sklearn digits.
"""
import json

import pytest
import torch
from torch import nn

import catalyst_fused as cf
from _helpers import assert_resumed_run_equals_straight_run
from catalyst_fused import prune as cli
from catalyst_fused.models import build_model
from catalyst_fused.pruning import (
    MODES,
    PruneConfig,
    build_target_set,
    bypass,
    find_targets,
    load_pruned,
    mask_model,
    prune_model,
    run_pipeline,
)

# A tiny bypass run (the shared tiny run) that prunes some channels and keeps others (mechanics, not quality).
BYPASS = dict(formulation="bypass", opt2_epochs=2)


def _warm_bn(model):
    """Non-trivial BN running statistics, so eval-mode checks are not vacuous."""
    model.train()
    with torch.no_grad():
        model(torch.randn(32, *_shape(model)))
    return model


def _shape(model):
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return (1, 8, 8) if first.in_channels == 1 else (3, 16, 16)


def _targets(model):
    """The targets the bypass formulation takes (single-producer groups) of ``model``."""
    return bypass.supported_targets(find_targets(model, _shape(model)))[0]


def _plain_cnn():
    """No BatchNorm: the bypass goes on the activation modules (one per layer, one in place)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 6, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )


def _wrapped(model, mode, c0=1.3):
    targets = _targets(model)
    ts = build_target_set(model, mode, targets=targets)
    catalysts = cf.init_catalysts(ts.weights, c0=c0, layout=ts.layout)
    return bypass.attach(model, targets, mode, catalysts), targets, catalysts


# ------------------------------------------------------------------------------------- extended model
@pytest.mark.parametrize("name,mode", [("small_cnn", m) for m in MODES] + [("resnet56", "group"), ("plain", "group")])
def test_extended_model_computes_the_original_function_at_init(name, mode):
    model = _warm_bn(_plain_cnn() if name == "plain" else build_model(name))
    wrapped, targets, catalysts = _wrapped(model, mode)
    ws = bypass.catalysts(wrapped, targets)
    assert len(bypass.wrappers(wrapped)) == len(targets)
    for w, d in zip(ws, catalysts):  # d = dbar = c0 * n
        torch.testing.assert_close(w.detach(), d.detach(), rtol=0, atol=0)
    for _, w in bypass.wrappers(wrapped):
        assert torch.equal(w.d, w.dbar)
    x = torch.randn(6, *_shape(model))
    for train in (True, False):
        model.train(train)
        wrapped.train(train)
        with torch.no_grad():
            assert torch.equal(wrapped(x), model(x)), f"train={train}"
    # the original model is untouched
    assert not bypass.is_wrapped(model)


def test_sites_and_taps():
    model = build_model("small_cnn")
    targets = _targets(model)
    assert [(s.name, s.tap) for s in bypass.find_sites(model, targets, "group")] == [("bn1", "input"), ("bn2", "input"), ("bn3", "input")]
    assert {s.tap for s in bypass.find_sites(model, targets, "bn")} == {"output"}
    plain = _plain_cnn()
    assert [s.name for s in bypass.find_sites(plain, _targets(plain), "filter")] == ["1", "3"]


def test_coupled_groups_are_left_to_the_regularizer_formulation():
    model = build_model("resnet56")
    targets = find_targets(model, _shape(model))
    supported, excluded = bypass.supported_targets(targets)
    assert len(supported) == 27 and all(len(t.producers) == 1 for t in supported)  # the blocks' inner channels
    assert len(excluded) == 3 and all("coupled group" in e["reason"] for e in excluded)  # one residual group per stage
    with pytest.raises(ValueError, match="coupled group"):
        bypass.find_sites(model, targets, "group")


def test_gradients_reach_d_and_dbar_and_the_penalty_reaches_d_only():
    model = _warm_bn(build_model("small_cnn"))
    wrapped, targets, _ = _wrapped(model, "group")
    ts = build_target_set(wrapped, "group", targets=bypass.inner_targets(wrapped, targets))
    catalysts = bypass.catalysts(wrapped, targets)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(wrapped(x), y).backward()
    loss_grads = []
    for _, w in bypass.wrappers(wrapped):
        assert w.d.grad is not None and float(w.d.grad.abs().sum()) > 0
        torch.testing.assert_close(w.dbar.grad, -w.d.grad, rtol=0, atol=0)  # equal and opposite loss gradients
        loss_grads.append(w.d.grad.clone())
    gamma = 0.3
    stats = cf.penalty_(ts.weights, catalysts, scale=gamma, layout=ts.layout)
    norms = cf.split_per_weight(stats.norms, catalysts)
    for (_, w), g, d, n in zip(bypass.wrappers(wrapped), loss_grads, catalysts, norms):
        assert w.d is d  # the fused penalty updates the bypass's own d
        torch.testing.assert_close(w.d.grad, g + gamma * torch.sign(d.detach()) * n, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w.dbar.grad, -g, rtol=0, atol=0)
    # ratios are |d| / n over the same groups as the regularizer mode: 1.3 at init
    torch.testing.assert_close(stats.ratios, torch.full_like(stats.ratios, 1.3))


def test_bypass_surgery_slices_d_and_dbar_and_equals_the_masked_model():
    torch.manual_seed(1)
    model = _warm_bn(build_model("small_cnn"))
    wrapped, targets, _ = _wrapped(model, "group")
    with torch.no_grad():  # a non-zero bypass, so that the check covers it
        for _, w in bypass.wrappers(wrapped):
            w.dbar.add_(torch.randn_like(w.dbar) * 0.3)
    keep = {t.name: sorted(torch.randperm(t.channels)[: t.channels // 3].tolist()) for t in targets}
    pruned = bypass.prune(wrapped, targets, keep).eval()
    masked = mask_model(wrapped, bypass.inner_targets(wrapped, targets), keep).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
    old = {w.producer: w for _, w in bypass.wrappers(wrapped)}
    for _, w in bypass.wrappers(pruned):
        idx = torch.tensor(keep[w.producer])
        assert torch.equal(w.d, old[w.producer].d[idx]) and torch.equal(w.dbar, old[w.producer].dbar[idx])
        assert w.sigma.num_features == len(idx)
    assert len(bypass.wrappers(wrapped)) == 3 and old["conv1"].d.shape == (32,)  # the input is untouched


@pytest.mark.parametrize("mode", ["bn", "group"])
def test_removing_zero_groups_keeps_the_extended_models_function(mode):
    """A channel whose group is exactly 0 (c = inf) can be removed with its bypass entries, even when its bypass
    coefficient d - dbar is not 0: the bypass taps a tensor that is 0 for such a channel (the conv output in
    group mode, the BN output in bn mode)."""
    model = _warm_bn(build_model("small_cnn")).eval()
    wrapped, targets, _ = _wrapped(model, mode)
    modules = dict(wrapped.named_modules())
    keep = {}
    with torch.no_grad():
        for t, (_, w) in zip(targets, bypass.wrappers(wrapped)):
            w.d.add_(torch.randn_like(w.d))  # a non-zero bypass on every channel
            drop = torch.arange(0, t.channels, 2)
            w.sigma.weight[drop] = 0
            w.sigma.bias[drop] = 0
            if mode == "group":
                modules[t.name].weight[drop] = 0
                for c in t.consumers:
                    modules[c.module].weight[:, drop] = 0
            keep[t.name] = torch.arange(1, t.channels, 2).tolist()
    ts = build_target_set(wrapped, mode, targets=bypass.inner_targets(wrapped, targets))
    assert int((cf.group_norms(ts.weights, layout=ts.layout) == 0).sum()) == sum(t.channels // 2 for t in targets)
    pruned = bypass.prune(wrapped, targets, keep).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), wrapped(x), rtol=1e-5, atol=1e-5)


def test_snap_and_fold_gives_the_plain_narrower_architecture():
    model = _warm_bn(build_model("small_cnn"))
    wrapped, targets, _ = _wrapped(model, "group")
    keep = {t.name: list(range(0, t.channels, 2)) for t in targets}
    pruned = bypass.prune(wrapped, targets, keep)
    with torch.no_grad():
        for _, w in bypass.wrappers(pruned):
            w.d.add_(1e-3)
    x = torch.randn(8, 1, 8, 8)
    plain, info = bypass.snap_and_fold(pruned, 1e-2, lambda m: 50.0, x)
    assert not bypass.is_wrapped(plain) and bypass.is_wrapped(pruned)
    assert info["residual_max_abs_coefficient"] == pytest.approx(1e-3, rel=1e-3) and info["residual_ok"]
    assert info["snap_max_abs_logit_change"] > 0 and info["snap_accuracy_change"] == 0.0
    reference = prune_model(model, targets, keep)  # what a plain pruning gives: same modules, same tensors
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    # d = dbar exactly makes psi == sigma: the folded model equals the snapped wrapped model
    with torch.no_grad():
        for _, w in bypass.wrappers(pruned):
            w.d.copy_(w.dbar)
    pruned.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), pruned(x))


def test_opt2_penalty_gradient():
    model = build_model("small_cnn")
    wrapped, _, _ = _wrapped(model, "group")
    with torch.no_grad():
        for _, w in bypass.wrappers(wrapped):
            w.d.add_(torch.randn_like(w.d))
    params = bypass.bypass_parameters(wrapped)
    value = sum(2.5 * (w.d - w.dbar).square().sum() for _, w in bypass.wrappers(wrapped))
    expected = torch.autograd.grad(value, params)
    got = bypass.add_coefficient_penalty_grad_(wrapped, 2.5)
    assert got == pytest.approx(float(value.detach()), rel=1e-5)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    assert [bypass.opt2_mu(9.0, 2, e) for e in range(4)] == [3.0, 6.0, 9.0, 9.0]


def test_sites_that_cannot_carry_a_bypass_are_rejected():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv2(x)), 1), 1))

    model = Functional()
    with pytest.raises(ValueError, match=r"--formulation bypass: target conv1 has no BatchNorm"):
        bypass.attach(model, _targets(model), "group")
    shared = nn.ReLU()
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), shared, nn.Conv2d(4, 4, 3), shared, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="called 2x"):
        bypass.find_sites(seq, _targets(seq), "filter")
    wrapped, _, _ = _wrapped(build_model("small_cnn"), "group")
    with pytest.raises(ValueError, match="already"):
        bypass.attach(wrapped, _targets(build_model("small_cnn")), "group")


# --------------------------------------------------------------------------------------------- pipeline
def test_bypass_pipeline_prunes_verifies_folds_and_reports(tmp_path, tiny_config, quiet):
    report = run_pipeline(tiny_config("run", **BYPASS), log=quiet)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["formulation"] == "bypass" and on_disk["config"]["formulation"] == "bypass"
    prune = on_disk["stages"]["prune"]
    assert 0 < prune["channels_pruned"] < prune["channels_total"]
    v = prune["verification"]
    assert v["surgery_ok"] and v["function_ok"], v  # pruned wrapped model == regularized wrapped model
    opt2 = on_disk["opt2"]
    assert opt2 == on_disk["stages"]["opt2"] and opt2["epochs"] == 2
    for key in ("initial_max_abs_coefficient", "residual_max_abs_coefficient", "snap_accuracy_change", "snap_max_abs_logit_change"):
        assert key in opt2
    assert opt2["residual_max_abs_coefficient"] < opt2["initial_max_abs_coefficient"]
    assert on_disk["accuracy"]["after_opt2"] == opt2["accuracy_after_snap"]
    assert [h["epoch"] for h in on_disk["history"] if h["stage"] == "opt2"] == [1, 2]
    # the final model: no bypass, the original architecture with the kept widths
    model = load_pruned("small_cnn", tmp_path / "run")  # rebuilt from the definition: fails if a bypass tensor was saved
    assert not bypass.is_wrapped(model)
    targets = _targets(build_model("small_cnn"))
    widths = {t.name: list(range(report.per_layer_kept[t.name])) for t in targets}
    reference = prune_model(build_model("small_cnn"), targets, widths)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_bypass_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_config, quiet):
    kw = dict(BYPASS, dense_epochs=1, epochs=2, finetune_epochs=1, opt2_epochs=2, train_limit=192, test_limit=64)
    straight = run_pipeline(tiny_config("a", **kw), log=quiet)
    # interrupted in opt1 (dense 1 + opt1 1), then in opt2 (opt1 2 + opt2 1), then to the end
    first = run_pipeline(tiny_config("b", **kw), stop_after_epochs=2, log=quiet)
    assert first.status == "interrupted" and first.stage == "opt1"
    second = run_pipeline(PruneConfig(out=str(tmp_path / "b")), resume=True, stop_after_epochs=2, log=quiet)
    assert second.status == "interrupted" and second.stage == "opt2"
    resumed = run_pipeline(PruneConfig(out=str(tmp_path / "b")), resume=True, log=quiet)
    assert_resumed_run_equals_straight_run(tmp_path / "a", tmp_path / "b", straight, resumed)
    assert straight.opt2 == resumed.opt2


def test_catalyst_rescaling_keeps_the_extended_models_function():
    """The threshold tracking and the target feedback multiply the catalysts d; in the extended model d is in the
    forward pass, so dbar moves with it (d - dbar unchanged): the function stays, the ratios move."""
    torch.manual_seed(0)
    model = _warm_bn(build_model("small_cnn"))
    pruner = cf.Pruner(model, (1, 8, 8), formulation="bypass", c0=1.3, target_speedup=1.5)
    x = torch.randn(8, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    ratios = torch.cat([d.detach().clone() for d in pruner.catalysts])
    factors = torch.exp(torch.randn(ratios.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    pruner.rescale_catalysts_(factors)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([d.detach() for d in pruner.catalysts]).double(), ratios.double() * factors,
                               rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- bad configs
def test_bad_bypass_configurations_give_clear_errors(tmp_path, quiet):
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match="--formulation: unknown formulation 'extended'"):
        run_pipeline(PruneConfig(out=out, formulation="extended"), log=quiet)
    with pytest.raises(ValueError, match="--opt2-epochs must be >= 0"):
        run_pipeline(PruneConfig(out=out, formulation="bypass", opt2_epochs=-1), log=quiet)
    with pytest.raises(ValueError, match="--opt2-ramp must be >= 0"):
        run_pipeline(PruneConfig(out=out, opt2_ramp=-2), log=quiet)
    for name, value in (("mu", 0.0), ("mu", float("inf")), ("lr", -1.0), ("tol", 0.0)):
        with pytest.raises(ValueError, match=f"--opt2-{name} must be a positive finite number"):
            run_pipeline(PruneConfig(out=out, formulation="bypass", **{f"opt2_{name}": value}), log=quiet)
    # 4 * lr * mu = 4 * 0.1 * 10 = 4 > 2 * (1 + 0.9) = 3.8: the opt2 step would diverge
    with pytest.raises(ValueError, match=r"--opt2-mu 10.0 is too large .* mu < 9.5"):
        run_pipeline(PruneConfig(out=out, formulation="bypass", opt2_lr=0.1), log=quiet)


def test_cli_bypass_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--formulation", "extended", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--formulation" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--formulation", "bypass", "--opt2-mu", "500", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--opt2-mu 500.0 is too large" in capsys.readouterr().err
    for flag in ("--opt2-epochs", "--opt2-ramp"):
        with pytest.raises(SystemExit) as e:
            cli.main([flag, "-1", "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    args = cli.build_parser().parse_args(["--formulation", "bypass", "--opt2-epochs", "3", "--opt2-mu", "2", "--opt2-lr", "0.02"])
    cfg = cli.config_from_args(args)
    assert (cfg.formulation, cfg.opt2_epochs, cfg.opt2_mu, cfg.opt2_lr, cfg.opt2_learning_rate) == ("bypass", 3, 2.0, 0.02, 0.02)
    assert cli.config_from_args(cli.build_parser().parse_args([])).formulation == "regularizer"
