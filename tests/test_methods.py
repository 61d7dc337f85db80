"""Catalyst and the baselines behind one interface (catalyst_fused/pruning/methods.py), and the experiment
scripts in experiments/ in their smoke setting."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from scipy.stats import spearmanr

import catalyst_fused as cf
from catalyst_fused.layout import GroupLayout, Slices
from catalyst_fused.pruning import PruneConfig, run_pipeline
from catalyst_fused.pruning.methods import (
    METHODS,
    check_max_prune_fraction,
    decision_flips,
    get_method,
    min_width,
    rank_decisions,
    scale_groups_,
    spearman,
    threshold_decisions,
    top_k_decisions,
    width_floors,
)
from catalyst_fused.models import build_model
from catalyst_fused.pruning.targets import TargetSet

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _grouped():
    """Two weights, one segment: group i = rows i of a (4 x 3) and columns i of b (2 x 4)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    layout = GroupLayout.build([a, b], [[Slices(0), Slices(1, dim=1)]])
    return a, b, layout


def _hand_norms(a, b):
    return (a.pow(2).sum(1) + b.pow(2).sum(0)).sqrt()


def test_scale_groups_multiplies_every_slice_of_a_group():
    a, b, layout = _grouped()
    f = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    a2, b2 = a.clone(), b.clone()
    scale_groups_([a2, b2], layout, f)
    torch.testing.assert_close(a2, a * f[:, None])
    torch.testing.assert_close(b2, b * f[None, :])
    w = torch.randn(3, 2, 2, dtype=torch.float64)
    w2 = w.clone()
    scale_groups_([w2], None, f[:3])
    torch.testing.assert_close(w2, w * f[:3, None, None])


def test_group_soft_threshold_is_the_group_lasso_proximal_step():
    a, b, layout = _grouped()
    ts = TargetSet("group", [], [a, b], layout)
    n = _hand_norms(a, b)
    tau = float(n.sort().values[1])  # the two smallest groups must vanish exactly
    get_method("lats_group").after_step(ts, gamma=tau / 0.5, lr=0.5)
    factor = (1 - tau / n).clamp_min(0)
    torch.testing.assert_close(_hand_norms(a, b), n * factor)
    assert int((_hand_norms(a, b) == 0).sum()) == 2


def test_elementwise_soft_threshold():
    w = torch.tensor([[0.3, -0.05, -0.4], [0.01, 0.2, -0.2]], dtype=torch.float64)
    ts = TargetSet("filter", [], [w], None)
    get_method("lats_channel").after_step(ts, gamma=0.1, lr=1.0)
    expected = torch.tensor([[0.2, 0.0, -0.3], [0.0, 0.1, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(w, expected)


def test_group_lasso_adds_the_subgradient_and_drops_the_catalyst_gradient():
    a, b, layout = _grouped()
    a.requires_grad_(True)
    b.requires_grad_(True)
    ts = TargetSet("group", [], [a, b], layout)
    method = get_method("group_lasso")
    catalysts = method.init_catalysts(ts, c0=1.0)
    assert [d.tolist() for d in catalysts] == [[1.0] * 4]
    method.regularize(ts, catalysts, 0.3)
    n = _hand_norms(a.detach(), b.detach())
    torch.testing.assert_close(a.grad, 0.3 * a.detach() / n[:, None])
    torch.testing.assert_close(b.grad, 0.3 * b.detach() / n[None, :])
    # constant catalysts do not require grad: penalty_ writes them no gradient (since kernels-cpu), or a zeroed one
    assert catalysts[0].grad is None or not catalysts[0].grad.any()


def test_statistics_of_each_method():
    a, b, layout = _grouped()
    ts = TargetSet("group", [], [a, b], layout)
    n = _hand_norms(a, b)
    for name in ("group_lasso", "lats_channel", "lats_group"):
        torch.testing.assert_close(get_method(name).scores(ts, [])[0], -torch.log10(n))
    catalysts = cf.init_catalysts([a, b], c0=1.0, layout=layout)
    with torch.no_grad():
        catalysts[0][0] *= 1000.0
    s = get_method("catalyst").scores(ts, catalysts)[0]
    torch.testing.assert_close(s, torch.tensor([3.0, 0, 0, 0], dtype=torch.float64), atol=1e-9, rtol=0)
    assert get_method("slimming").effective_mode("group", True) == ("bn", False)


def test_unknown_method_names_the_flag():
    with pytest.raises(ValueError, match="--method: unknown method 'l2'"):
        get_method("l2")
    with pytest.raises(ValueError, match="--method"):
        PruneConfig(method="l2").validate()
    with pytest.raises(ValueError, match="--formulation bypass is Catalyst's"):
        PruneConfig(method="group_lasso", formulation="bypass").validate()
    with pytest.raises(ValueError, match="--norm-threshold"):
        PruneConfig(method="group_lasso", gamma=0.01, norm_threshold=0.0).validate()
    with pytest.raises(ValueError, match="--noise-level"):
        PruneConfig(noise_level=float("nan")).validate()
    with pytest.raises(ValueError, match="--noise-draws"):
        PruneConfig(noise_draws=0).validate()


def test_threshold_and_rank_decisions_never_empty_a_layer():
    scores = [torch.tensor([5.0, 4.0, 3.0]), torch.tensor([2.0, 6.0])]
    masks = threshold_decisions(scores, 0.0)
    assert [m.tolist() for m in masks] == [[True, True, False], [False, True]]
    # ranking: 6 (seg 1), 5, 4 (seg 0), then 3 is seg 0's last channel and 2 is seg 1's last: skipped
    assert [m.tolist() for m in top_k_decisions(scores, 3)] == [[True, True, False], [False, True]]
    assert [m.tolist() for m in top_k_decisions(scores, 10)] == [[True, True, False], [False, True]]

    def speedup_of(masks):  # every removed channel is worth 1 unit out of 5
        return 5.0 / (5.0 - sum(int(m.sum()) for m in masks))

    masks = rank_decisions(scores, speedup_of, 5.0 / 3.0)
    assert sum(int(m.sum()) for m in masks) == 2 and masks[1].tolist() == [False, True]
    masks = rank_decisions(scores, speedup_of, 100.0)  # unreachable: everything removable goes
    assert sum(int(m.sum()) for m in masks) == 3


def test_min_width_rounds_up_and_keeps_one():
    assert [min_width(n) for n in (1, 2, 10, 11, 16, 20, 32, 512)] == [1, 1, 1, 2, 2, 2, 4, 52]  # 0.1 * 20 is 2, not 3
    assert [min_width(n, 1.0) for n in (1, 16, 512)] == [1, 1, 1]
    assert min_width(16, 0.5) == 8 and width_floors([4, 64], 0.75) == [1, 16]
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="max_prune_fraction must be a number in"):
            check_max_prune_fraction(bad)
    with pytest.raises(ValueError, match="--max-prune-fraction"):
        PruneConfig(max_prune_fraction=0.0).validate()


def test_decisions_keep_the_width_floor():
    """With floors, the threshold and the ranking stop at each segment's floor; the channels that stay are the
    ones with the smallest statistic."""
    scores = [torch.tensor([5.0, 4.0, 3.0, 1.0]), torch.tensor([2.0, 6.0, 7.0])]
    masks = threshold_decisions(scores, 0.0, floors=[2, 1])
    assert [m.tolist() for m in masks] == [[True, True, False, False], [False, True, True]]
    # ranking: 7 (seg 1, then its floor of 2 stops it), 5, 4 (seg 0, then its floor of 2 stops it)
    assert [m.tolist() for m in top_k_decisions(scores, 10, floors=[2, 2])] == [[True, True, False, False],
                                                                              [False, False, True]]

    def speedup_of(masks):  # every removed channel is worth 1 unit out of 7
        return 7.0 / (7.0 - sum(int(m.sum()) for m in masks))

    masks = rank_decisions(scores, speedup_of, 100.0, floors=[3, 2])  # unreachable: down to the floors
    assert [m.tolist() for m in masks] == [[True, False, False, False], [False, False, True]]
    with pytest.raises(ValueError, match="one minimum width per segment"):
        threshold_decisions(scores, 0.0, floors=[1])


def test_baselines_respect_the_width_floor_of_the_pruner():
    """An unreachable target: the random ranking removes every channel it may, and each target then keeps
    exactly its floor (4 of 32 with the default 0.9, 16 of 32 with 0.5)."""
    for fraction, floor in ((0.9, 4), (0.5, 16)):
        torch.manual_seed(0)
        model = build_model("small_cnn", num_classes=10, in_channels=1)
        pruner = cf.Pruner(model, (1, 8, 8), method="random", gamma=0.0, target_speedup=1000.0,
                           max_prune_fraction=fraction)
        for d, t in zip(pruner.decisions(), pruner.targets):
            assert d.channels - int(d.prune.sum()) == min_width(d.channels, fraction)
            assert d.forced_keep
        assert min(d.channels - int(d.prune.sum()) for d in pruner.decisions()) == floor
    with pytest.raises(ValueError, match="Pruner: max_prune_fraction"):
        cf.Pruner(model, (1, 8, 8), method="random", gamma=0.0, max_prune_fraction=0)


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (40,), generator=gen).double()
    y = x + torch.randn(40, generator=gen, dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert spearman(torch.ones(5), torch.arange(5.0)) is None


def test_decision_flips_counts_changed_decisions():
    w = [torch.tensor([[1.0, 0.0], [0.0, 1e-3], [2.0, 2.0]])]
    ts = TargetSet("filter", [], w, None)
    method = get_method("group_lasso")

    def scores_of(ws):
        return method.scores(ts, [], ws)

    def decide(sc):
        return threshold_decisions(sc, 2.0)  # prune iff n <= 0.01

    ref = decide(scores_of(w))
    assert ref[0].tolist() == [False, True, False]
    assert decision_flips(decide, scores_of, w, ref, noise=0.0, draws=2)["mean_flip_fraction"] == 0.0
    # 1000 % noise on a norm 1e-3 from the threshold's 1e-2: flips in some draw
    flips = decision_flips(decide, scores_of, w, ref, noise=20.0, draws=8)
    assert 0 < flips["max_flip_fraction"] <= 1


# budgets of a baseline run (the shared tiny run, shorter)
SHORT = dict(dense_epochs=2, epochs=2, train_limit=256, gamma=0.03, c0=1.2, kappa=2.0)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "catalyst"])
def test_every_baseline_runs_through_the_pipeline_to_a_target(tiny_config, quiet, method):
    cfg = tiny_config(method, **dict(SHORT, method=method, target_speedup=1.5, gamma=0.01))
    report = run_pipeline(cfg, log=quiet)
    assert report.status == "done" and report.method == method
    assert report.cost.flops_ratio >= 1.5
    prune = report.stages.prune
    assert prune.method == method and "global ranking" in prune.rule and f"the {prune.channels_pruned} channels" in prune.rule
    assert prune.verification["surgery_ok"]
    assert 0 <= prune.robustness["mean_flip_fraction"] <= 1
    ch = prune.channels
    assert len(ch["initial_norm"]) == len(ch["statistic"]) == len(ch["pruned"]) == prune.channels_total
    assert sum(ch["pruned"]) == prune.channels_pruned > 0
    assert report.stages.opt1.epochs_run == 2  # no stop rule: the whole budget
    assert isinstance(prune.warnings, list)
    if method == "slimming":
        assert prune.statistic == "-log10 |bn.gamma|"
    if method.startswith("lats"):
        assert report.stages.opt1.final_threshold > 0


def test_dense_checkpoint_is_reused_and_checked(tmp_path, tiny_config, quiet):
    first = run_pipeline(tiny_config("a", **SHORT), log=quiet)
    dense = tmp_path / "a" / "dense_model.pt"
    assert dense.exists()
    second = run_pipeline(tiny_config("b", dense_checkpoint=str(dense), **SHORT), log=quiet)
    assert second.stages.dense.epochs == 0
    assert second.accuracy.dense == first.accuracy.dense
    with pytest.raises(ValueError, match="--dense-checkpoint: no file"):
        PruneConfig(dense_checkpoint=str(tmp_path / "missing.pt")).validate()
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit model small_cnn"):
        run_pipeline(tiny_config("c", dense_checkpoint=str(wrong), **SHORT), log=quiet)


@pytest.mark.slow
def test_experiment_scripts_produce_complete_results(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    runs, results = tmp_path / "runs", tmp_path / "results"
    for script in ("magnitude_bias", "margin_robustness", "accuracy_vs_flops"):
        command = [sys.executable, str(REPO_ROOT / "experiments" / f"{script}.py"), "--setting", "smoke",
                   "--runs-dir", str(runs), "--results-dir", str(results)]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{script}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        md = (results / f"{script}_smoke.md").read_text()
        assert "Claim check:" in md
        for method in METHODS:
            assert f"| {method} |" in md, f"{script}: no row for {method}"
        assert (results / f"{script}_smoke.png").stat().st_size > 0
        data = json.loads((results / f"{script}_smoke.json").read_text())
        assert data["setting"] == "smoke" and data["verdict"]
    points = json.loads((results / "accuracy_vs_flops_smoke.json").read_text())["points"]
    assert {p["method"] for p in points} == set(METHODS)
    for p in points:
        assert p["seeds"] == [0, 1]
        assert 0 <= p["acc_finetuned"][0] <= 100 and math.isfinite(p["flops_ratio"][0])


def test_a_collapsing_opt1_is_reported(tiny_config, quiet):
    cfg = tiny_config(**dict(SHORT, dense_epochs=8, train_limit=512, gamma=3.0, c0=1.5))  # a trained model, a huge penalty
    report = run_pipeline(cfg, log=quiet)
    acc = report.accuracy
    assert acc.dense - acc.regularized > 10, acc  # the configuration does collapse the model
    assert "too large for this model" in report.stages.prune.warnings[0]
