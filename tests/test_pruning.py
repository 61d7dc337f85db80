"""The pruning workflow: targets, physical removal, verification, resume, calibration, data loaders, CLI.

Everything runs on CPU with small models and a few epochs on subsets of sklearn digits.
"""
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import catalyst_fused as cf
from _helpers import assert_resumed_run_equals_straight_run
from catalyst_fused import prune as cli
from catalyst_fused.data import load_dataset
from catalyst_fused.models import build_model
from catalyst_fused.pruning import (
    MODES,
    PruneConfig,
    build_target_set,
    count_flops,
    count_params,
    find_targets,
    load_pruned,
    mask_model,
    prune_model,
    run_pipeline,
)
from catalyst_fused.pruning.workflow.runner import load_checkpoint

# ------------------------------------------------------------------------------------------- targets
SHAPES = {"small_cnn": (1, 8, 8), "resnet56": (3, 16, 16), "vgg19_bn": (3, 32, 32)}


def _names(pieces):
    return [p.module for p in pieces]


def test_targets_of_the_models():
    small = find_targets(build_model("small_cnn"), SHAPES["small_cnn"])
    assert [t.name for t in small] == ["conv1", "conv2", "conv3"]
    assert _names(small[-1].consumers) == ["fc"]  # conv3 -> bn3 -> relu -> avgpool(1) -> flatten -> fc

    res = find_targets(build_model("resnet56"), SHAPES["resnet56"])
    # 27 inner block channels + one residual group per stage
    assert len(res) == 30 and sum(t.channels for t in res) == 9 * (16 + 32 + 64) + 16 + 32 + 64
    inner = [t for t in res if len(t.producers) == 1]
    assert len(inner) == 27
    assert all(t.name.endswith(".conv1") and _names(t.consumers) == [t.name[: -len("conv1")] + "conv2"] for t in inner)
    assert [t.name for t in res if len(t.producers) > 1] == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]

    vgg = find_targets(build_model("vgg19_bn"), SHAPES["vgg19_bn"])
    assert len(vgg) == 17 and _names(vgg[-2].consumers) == ["classifier.0"]
    assert vgg[-1].name == "classifier.0" and _names(vgg[-1].consumers) == ["classifier.2"] and not vgg[-1].bns


@pytest.mark.parametrize("name", list(SHAPES))
def test_logit_layer_is_never_a_target(name):
    model = build_model(name)
    targets, excluded = find_targets(model, SHAPES[name], return_excluded=True)
    logits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert logits not in {p.module for t in targets for p in t.producers}
    assert excluded == [{"producers": [logits], "reason": f"its channels are a model output ({logits})"}]


@pytest.mark.parametrize("mode", MODES)
def test_target_set_feeds_the_penalty(mode):
    model = build_model("small_cnn")
    ts = build_target_set(model, mode, input_shape=(1, 8, 8))
    catalysts = cf.init_catalysts(ts.weights, c0=1.0, layout=ts.layout)
    stats = cf.penalty(ts.weights, catalysts, layout=ts.layout, return_stats=True)
    assert stats.ratios.numel() == 32 + 64 + 64
    torch.testing.assert_close(stats.ratios, torch.ones_like(stats.ratios))


# ------------------------------------------------------------------------------------------- surgery
def _randomize_bn(model):
    """Non-trivial BN statistics and affine parameters, so that every channel matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_pruned_model_is_smaller_runs_and_equals_masked_model(name):
    """Random channels of every coupled group removed: a smaller model with the masked model's function."""
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name)
    _randomize_bn(model)
    model.eval()
    targets = find_targets(model, shape)
    keep = {t.name: torch.randperm(t.channels)[: max(1, t.channels // 3)].tolist() for t in targets}
    pruned = prune_model(model, targets, keep).eval()
    masked = mask_model(model, targets, keep).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        y_pruned, y_masked, y = pruned(x), masked(x), model(x)
    scale = float(y_masked.abs().max())
    assert scale > 0 and not torch.allclose(y_masked, y)  # the removal matters
    torch.testing.assert_close(y_pruned, y_masked, rtol=0, atol=1e-5 * scale)
    assert count_params(pruned) < count_params(model)
    assert count_flops(pruned, shape)["macs"] < count_flops(model, shape)["macs"]
    # genuinely smaller modules, not masks: every producer and BN of a group has the kept width
    modules = dict(pruned.named_modules())
    for t in targets:
        for p in t.producers:
            assert modules[p.module].weight.shape[0] == len(keep[t.name])
        for b in t.bns:
            assert modules[b.module].num_features == len(keep[t.name])
    # the original is untouched
    assert dict(model.named_modules())[targets[0].name].out_channels == targets[0].channels


@pytest.mark.parametrize("mode", ["bn", "group"])
def test_removing_zero_groups_keeps_the_function(mode):
    """A channel whose group is exactly 0 (what c -> inf means) can be removed without changing outputs."""
    torch.manual_seed(0)
    model = build_model("small_cnn")
    # make BN running stats non-trivial
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))
    model.eval()
    targets = find_targets(model, (1, 8, 8))
    ts = build_target_set(model, mode, targets=targets)
    modules = dict(model.named_modules())
    keep = {}
    with torch.no_grad():
        for t in targets:
            drop = torch.arange(0, t.channels, 2)
            for b in t.bns:
                modules[b.module].weight[drop] = 0
                modules[b.module].bias[drop] = 0
            if mode == "group":
                for p in t.producers:
                    modules[p.module].weight[drop] = 0
                for c in t.consumers:
                    modules[c.module].weight[:, drop] = 0
            keep[t.name] = torch.arange(1, t.channels, 2).tolist()
    norms = cf.group_norms(ts.weights, layout=ts.layout)
    assert int((norms == 0).sum()) == sum(t.channels // 2 for t in targets)
    x = torch.randn(4, 1, 8, 8)
    pruned = prune_model(model, targets, keep).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)


def test_prune_model_rejects_bad_keeps():
    model = build_model("small_cnn")
    targets = find_targets(model, (1, 8, 8))
    with pytest.raises(ValueError, match="keep\\['conv1'\\].*no channel"):
        prune_model(model, targets, {"conv1": []})
    with pytest.raises(ValueError, match="out of range"):
        prune_model(model, targets, {"conv1": [0, 99]})
    with pytest.raises(ValueError, match="'bn1'.*not targets"):
        prune_model(model, targets, {"bn1": [0]})


# ------------------------------------------------------------------------------------------ pipeline
REPORT_KEYS = {
    "status", "config", "dataset", "targets", "c0_used", "stages", "accuracy", "cost", "per_layer_kept",
    "margin_log10c", "undecided_total", "history", "runtime_s", "plots",
}


def test_pipeline_prunes_verifies_and_reports(tmp_path, tiny_config, quiet):
    report = run_pipeline(tiny_config("run"), log=quiet)
    assert REPORT_KEYS <= set(report.to_dict())
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert REPORT_KEYS <= set(on_disk)
    for stage in ("dense", "regularized", "after_removal", "after_finetune"):
        assert 0 <= on_disk["accuracy"][stage] <= 100
    cost = on_disk["cost"]
    for side in ("dense", "pruned"):
        assert cost[side]["flops"]["macs"] > 0 and cost[side]["params"] > 0 and cost[side]["latency"]["median_ms"] > 0
    assert cost["flops_ratio"] > 1.0 and cost["params_ratio"] > 1.0  # something was removed
    prune = on_disk["stages"]["prune"]
    assert prune["channels_pruned"] > 0
    assert set(prune["per_layer"]) == {"conv1", "conv2", "conv3"}
    assert prune["verification"]["surgery_ok"]
    # decided channels only were removed, so the pruned model computes the regularized model's function
    assert prune["verification"]["function_ok"], prune["verification"]
    assert prune["accuracy_after_removal"] == pytest.approx(prune["accuracy_regularized"], abs=2.0)
    assert prune["margin_log10c"] is not None
    # the default formulation is regularizer-only: opt2 is skipped
    assert on_disk["formulation"] == "regularizer" and on_disk["opt2"] is None and "opt2" not in on_disk["stages"]
    assert on_disk["accuracy"]["after_opt2"] is None and not any(h["stage"] == "opt2" for h in on_disk["history"])
    opt1 = next(h for h in on_disk["history"] if h["stage"] == "opt1")
    assert opt1["stage"] == "opt1" and "fraction_decided" in opt1 and "hist" in opt1["layers"]["conv1"]
    saved = load_pruned("small_cnn", tmp_path / "run")  # the safe files: weights + spec, rebuilt from the definition
    out = saved.eval()(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    assert count_params(saved) == cost["pruned"]["params"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_config, quiet):
    kw = dict(dense_epochs=1, epochs=2, finetune_epochs=2, train_limit=192, test_limit=64, plots=True)
    straight = run_pipeline(tiny_config("a", **kw), log=quiet)
    # interrupted after 2 training epochs (dense 1 + opt1 1), resumed for 2 more (opt1 2 + fine-tune 1), then to the end
    first = run_pipeline(tiny_config("b", **kw), stop_after_epochs=2, log=quiet)
    assert first.status == "interrupted" and first.stage == "opt1"
    second = run_pipeline(PruneConfig(out=str(tmp_path / "b")), resume=True, stop_after_epochs=2, log=quiet)
    assert second.status == "interrupted" and second.stage == "finetune"
    resumed = run_pipeline(PruneConfig(out=str(tmp_path / "b")), resume=True, log=quiet)
    assert_resumed_run_equals_straight_run(tmp_path / "a", tmp_path / "b", straight, resumed)


def test_a_killed_run_keeps_the_time_of_its_epochs(tmp_path, tiny_config, quiet, monkeypatch):
    """A kill leaves the checkpoint of the last finished epoch and nothing after it: that checkpoint counts the
    stage's time so far, so that the resumed run's runtime includes the epochs made before the kill."""
    from catalyst_fused.pruning.workflow.runner import Run

    real = Run.end_of_epoch

    def end_of_epoch(self, stage, epoch, record, **kw):
        real(self, stage, epoch, record, **kw)
        if stage == "opt1":
            raise KeyboardInterrupt  # as a kill: no code of the workflow runs after the checkpoint

    monkeypatch.setattr(Run, "end_of_epoch", end_of_epoch)
    cfg = tiny_config("k", dense_epochs=1, epochs=2, finetune_epochs=0, train_limit=128, test_limit=64)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, log=quiet)
    banked = load_checkpoint(tmp_path / "k" / "checkpoint.pt").elapsed
    assert banked["dense"] > 0 and banked["opt1"] > 0
    monkeypatch.undo()
    report = run_pipeline(PruneConfig(out=str(tmp_path / "k")), resume=True, log=quiet)
    assert report.runtime_s["opt1"] > banked["opt1"] and report.runtime_s["dense"] == banked["dense"]


def test_a_target_speedup_is_reached_in_one_opt1_run_and_the_stop_rule_fires(tiny_config, quiet):
    """Catalyst steers its undecided catalysts to the target during opt1 (gamma from the budget): no search over
    runs, every channel decided before the budget ends, and the removal is lossless."""
    cfg = tiny_config("t", target_speedup=1.6, c0=1.0, gamma="auto", epochs=10, finetune_epochs=0, opt1_lr=None)
    report = run_pipeline(cfg, log=quiet)
    cal, op, prune = report.stages.calibration, report.stages.opt1, report.stages.prune
    assert cal.gamma_auto and cal.gamma > 0 and cal.budget_steps == 10 * 8 and cal.target_speedup == 1.6
    assert cal.predictions["force_step"] == 64
    assert op.stop_rule_fired and op.decisions["decided"] == prune.channels_total and prune.undecided_total == 0
    assert report.cost.flops_ratio == pytest.approx(1.6, rel=0.1)
    assert prune.verification["function_ok"], prune.verification
    assert prune.accuracy_after_removal == pytest.approx(prune.accuracy_regularized, abs=1.0)


# --------------------------------------------------------------------------------------- bad configs
def test_bad_configurations_give_clear_errors(tmp_path, quiet):
    with pytest.raises(ValueError, match="--mode"):
        run_pipeline(PruneConfig(out=str(tmp_path / "x"), mode="channel"), log=quiet)
    with pytest.raises(ValueError, match="--model"):
        run_pipeline(PruneConfig(out=str(tmp_path / "x"), model="lenet"), log=quiet)
    with pytest.raises(ValueError, match="unknown pruning mode 'channel'"):
        build_target_set(build_model("small_cnn"), "channel")
    with pytest.raises(ValueError, match="input_shape"):
        build_target_set(build_model("small_cnn"), "group")
    with pytest.raises(ValueError, match="input_shape"):
        find_targets(build_model("small_cnn"), (1, 0, 8))
    with pytest.raises(ValueError, match="no prunable layer"):
        build_target_set(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "bn", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="no prunable layer"):  # conv whose output is the logits
        build_target_set(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()), "filter", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="no prunable layer in mode 'bn'"):  # hidden layer without BatchNorm
        build_target_set(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2)), "bn", input_shape=(64,))
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_dataset("cifar10", missing)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run_pipeline(PruneConfig(out=str(tmp_path / "empty")), resume=True, log=quiet)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--mode", "channel", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--mode" in capsys.readouterr().err
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as e:
        cli.main(["--dataset", "imagefolder", "--data-root", missing, "--model", "resnet56", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--dataset", "cifar10", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--data-root" in capsys.readouterr().err


def test_cli_runs_a_tiny_configuration(tmp_path):
    out = tmp_path / "cli"
    code = cli.main(["--out", str(out), "--dense-epochs", "1", "--epochs", "1", "--finetune-epochs", "0",
                     "--no-progress", "--no-plots", "--gamma", "0.5", "--c0", "2", "--kappa", "1",
                     "--latency", "eager", "--stop-after-epochs", "1"])
    assert code == 0
    assert (out / "checkpoint.pt").exists()
    assert cli.main(["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["status"] == "done"


# --------------------------------------------------------------------------------------- data loaders
def test_digits_split_is_deterministic():
    a_train, a_test, info = load_dataset("digits", image_size=32, channels=3)
    b_train, _, _ = load_dataset("digits", image_size=32, channels=3)
    assert (info.train_size, info.test_size, info.num_classes) == (1400, 397, 10)
    assert a_train[0][0].shape == (3, 32, 32)
    assert torch.equal(a_train.tensors[1], b_train.tensors[1])


def _write_png(path, value):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)


def test_imagefolder_loader_on_tiny_files(tmp_path):
    root = tmp_path / "imgs"
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            _write_png(root / cls / f"{i}.png", 40 * c + i)
    train, test, info = load_dataset("imagefolder", str(root), image_size=16, channels=3)
    assert info.num_classes == 2 and len(train) + len(test) == 10 and len(test) == 2
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    # train/ + val/ layout
    split = tmp_path / "split"
    for sub in ("train", "val"):
        for cls in ("a", "b", "c"):
            (split / sub / cls).mkdir(parents=True)
            _write_png(split / sub / cls / "0.png", 100)
    train, test, info = load_dataset("imagefolder", str(split), image_size=8, channels=1)
    assert info.num_classes == 3 and len(train) == 3 and len(test) == 3 and train[0][0].shape == (1, 8, 8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_on_tiny_pickle_files(tmp_path, monkeypatch, name):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    # The tiny files cannot match torchvision's md5 sums; everything else is the real loader.
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / cls.base_folder
    folder.mkdir()
    label_key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(0)
    for fname, _ in cls.train_list + cls.test_list:
        entry = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), label_key: [0, 1, 2, 1]}
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    classes = [f"class{i}" for i in range(10 if name == "cifar10" else 100)]
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: classes}, f)
    train, test, info = load_dataset(name, str(tmp_path), image_size=32, channels=3)
    assert len(train) == 4 * len(cls.train_list) and len(test) == 4
    assert info.num_classes == len(classes)
    x, y = train[1]
    assert x.shape == (3, 32, 32) and y == 1
    # an existing directory without the files: clear error naming the path
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_dataset(name, str(empty))
