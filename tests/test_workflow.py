"""The workflow's reliability: divergence, damaged or foreign checkpoints, resume with other options, a
second run on the same output directory, CLI and data checks, and determinism that progress bars do not
change."""
import json
import os

import numpy as np
import pytest
import torch

from catalyst_fused import prune as cli
from catalyst_fused.pruning import PruneConfig, Report, run_pipeline
from catalyst_fused.pruning.workflow.runner import OutputBusyError, OutputLock


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverging_run_stops_at_once_and_says_so(tmp_path, tiny_config, quiet, capsys):
    cfg = tiny_config("nan", lr=1e4, dense_epochs=2)
    report = run_pipeline(cfg, log=quiet)
    assert report.status == "diverged" and "diverged at dense epoch 1" in report.error
    on_disk = _strict_json(tmp_path / "nan" / "report.json")
    assert on_disk["status"] == "diverged" and on_disk["error"] == report.error and on_disk["cost"] is None
    assert not (tmp_path / "nan" / "pruned_model.pt").exists()
    # the CLI exits with 1 and names the problem
    code = cli.main(["--out", str(tmp_path / "cli"), "--lr", "10000", "--dense-epochs", "1", "--train-limit", "256",
                     "--test-limit", "64", "--no-progress", "--no-plots"])
    assert code == 1 and "diverged" in capsys.readouterr().err


def test_reports_are_strict_json_and_typed(tmp_path, tiny_config, quiet):
    report = run_pipeline(tiny_config("run", finetune_epochs=0), log=quiet)
    on_disk = _strict_json(tmp_path / "run" / "report.json")
    loaded = Report.load(tmp_path / "run" / "report.json")
    assert loaded.accuracy == report.accuracy and loaded.stages.prune.channels_pruned == report.stages.prune.channels_pruned
    assert loaded.config == report.config and on_disk["cost"]["flops_ratio"] == report.cost.flops_ratio
    assert not [p for p in os.listdir(tmp_path / "run") if p.endswith(".tmp")]  # atomic writes leave nothing behind
    with pytest.raises(ValueError, match="not a readable report"):
        (tmp_path / "bad.json").write_text("{")
        Report.load(tmp_path / "bad.json")


def test_damaged_or_foreign_checkpoints_are_refused_naming_the_file(tmp_path, tiny_config, quiet):
    first = run_pipeline(tiny_config("run"), stop_after_epochs=1, log=quiet)
    assert first.status == "interrupted"
    ckpt = tmp_path / "run" / "checkpoint.pt"
    torch.load(ckpt, weights_only=True)  # nothing in our checkpoints needs pickled code
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{ckpt}.*truncated or corrupted"):
        run_pipeline(PruneConfig(out=str(tmp_path / "run")), resume=True, log=quiet)
    torch.save({"model": {}, "epoch": 3}, ckpt)
    with pytest.raises(ValueError, match=f"{ckpt} is not a checkpoint of this workflow"):
        run_pipeline(PruneConfig(out=str(tmp_path / "run")), resume=True, log=quiet)


def test_resume_lists_the_options_it_ignores(tmp_path, tiny_config):
    lines = []
    run_pipeline(tiny_config("run"), stop_after_epochs=1, log=lines.append)
    lines.clear()
    resumed = run_pipeline(PruneConfig(out=str(tmp_path / "run"), epochs=9, gamma=0.5, progress=False, plots=False),
                           resume=True, stop_after_epochs=1, log=lines.append)
    assert resumed.status == "interrupted"
    warning = next(line for line in lines if line.startswith("warning: --resume"))
    assert "--epochs 9 (saved: 6)" in warning and "--gamma 0.5 (saved: 0.1)" in warning


def test_a_second_run_on_the_same_output_directory_is_refused(tmp_path, tiny_config, quiet):
    out = tmp_path / "busy"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(OutputBusyError, match="another run is using this directory"):
            run_pipeline(tiny_config("busy"), log=quiet)
    assert run_pipeline(tiny_config("busy"), stop_after_epochs=1, log=quiet).status == "interrupted"  # free again


@pytest.mark.parametrize("argv,flag", [
    (["--data-root", "/tmp"], "--data-root"),
    (["--image-size", "0"], "--image-size"),
    (["--seed", "-1"], "--seed"),
    (["--momentum", "-0.1"], "--momentum"),
    (["--momentum", "1.0"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--batch-size", "0"], "--batch-size"),
    (["--gamma", "nan"], "--gamma"),
])
def test_cli_rejects_bad_values_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_config_validation_names_the_option():
    for kw, flag in (({"seed": -1}, "--seed"), ({"image_size": 0}, "--image-size"), ({"momentum": 1.2}, "--momentum"),
                     ({"data_root": "/x"}, "--data-root"), ({"lr": float("inf")}, "--lr")):
        with pytest.raises(ValueError, match=flag):
            PruneConfig(**kw).validate()


def _png(path, value=100):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)


def test_unreadable_images_and_too_small_splits_are_clear_errors(tmp_path, quiet):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _png(root / cls / f"{i}.png", 50 * i)
    (root / "a" / "9.png").write_bytes(b"not an image at all")
    kw = dict(model="small_cnn", dataset="imagefolder", data_root=str(root), image_size=8, dense_epochs=1, epochs=1,
              finetune_epochs=0, progress=False, plots=False, latency_batch=2)
    with pytest.raises(ValueError, match="cannot read image .*9.png"):
        run_pipeline(PruneConfig(out=str(tmp_path / "o"), **kw), log=quiet)
    one = tmp_path / "one" / "a"
    one.mkdir(parents=True)
    _png(one / "0.png")
    with pytest.raises(ValueError, match="0 test samples"):
        run_pipeline(PruneConfig(out=str(tmp_path / "o2"), **dict(kw, data_root=str(tmp_path / "one"))), log=quiet)
    assert not (tmp_path / "o2" / "checkpoint.pt").exists()  # rejected before training


def test_progress_bars_do_not_change_the_run(tiny_config, quiet):
    kw = dict(dense_epochs=1, epochs=1, finetune_epochs=1, train_limit=192, test_limit=64)
    a = run_pipeline(tiny_config("a", progress=False, **kw), log=quiet)
    b = run_pipeline(tiny_config("b", progress=True, **kw), log=quiet)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_progress_without_tqdm_falls_back_to_the_loader(monkeypatch, capsys):
    """tqdm is an optional extra: without it a run asked for progress bars says what it is doing and goes on."""
    import sys

    from catalyst_fused.pruning.workflow.training import _progress

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes `from tqdm.auto import tqdm` raise ImportError
    loader = [1, 2, 3]
    assert _progress(loader, True, "opt1 1/3") is loader
    assert "opt1 1/3 ..." in capsys.readouterr().out
    assert _progress(loader, False, "x") is loader


def test_run_pipeline_takes_a_users_model_data_and_loss(tmp_path, quiet):
    """The workflow is a client of the pruner: any model and datasets, not only the named ones."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 10, 3, padding=1),
                          nn.BatchNorm2d(10), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 3))
    x = torch.randn(96, 2, 6, 6)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    train, test = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        return nn.functional.cross_entropy(out, target, label_smoothing=0.1)

    cfg = PruneConfig(model="my_net", dataset="my_data", out=str(tmp_path / "own"), dense_epochs=1, epochs=2,
                      finetune_epochs=1, gamma=0.1, c0=1.5, kappa=1.0, batch_size=16, progress=False, plots=False,
                      latency_batch=4, latency="eager", latency_repeats=3)
    report = run_pipeline(cfg, model=model, train_data=DataLoader(train, batch_size=5), test_data=test, loss_fn=loss_fn,
                          log=quiet)
    assert report.status == "done" and calls and report.input_shape == [2, 6, 6]
    assert report.dataset["train_size"] == 64 and report.dataset["name"] == "custom"
    assert [t["name"] for t in report.targets] == ["0", "3"]
    # the caller's model object is the one pruned, in place
    assert model[0].out_channels == report.per_layer_kept["0"] and model[3].out_channels == report.per_layer_kept["3"]
    with pytest.raises(ValueError, match="both train_data and test_data"):
        run_pipeline(cfg, model=model, train_data=train, log=quiet)
    with pytest.raises(ValueError, match="--model: unknown model 'my_net'"):
        run_pipeline(cfg, train_data=train, test_data=test, log=quiet)
