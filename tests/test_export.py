"""The pruned model as a deliverable: ONNX and torch.export files checked against eager, the latency
comparison in every runtime, and the workflow's files (all loadable without running code) from the CLI."""
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import catalyst_fused as cf
from catalyst_fused import prune as cli
from catalyst_fused.models import build_model
from catalyst_fused.pruning import ExportCheckError, PruneConfig, Report, compare_latency, export_model, load_pruned
from catalyst_fused.pruning.latency import parse_runtimes, parse_threads

ort = pytest.importorskip("onnxruntime", reason="the [export] extra (requirements.txt installs it for CI)")


def _pruned_small_cnn():
    torch.manual_seed(0)
    model = build_model("small_cnn")
    pruner = cf.Pruner(model, (1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        summary = pruner.prune({t.name: torch.arange(0, t.channels, 3) for t in pruner.targets})
    return model.eval(), summary


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.slow
def test_export_writes_onnx_and_pt2_that_match_eager(tmp_path):
    model, _ = _pruned_small_cnn()
    x = torch.randn(16, 1, 8, 8)
    results = export_model(model, x[:1], tmp_path / "m", ("onnx", "pt2"), check_inputs=x)  # batch 1 traces too
    for fmt in ("onnx", "pt2"):
        r = results[fmt]
        assert r.ok and r.error is None and r.path == str(tmp_path / f"m.{fmt}") and r.check_samples == 16
        assert r.max_abs_err <= r.tol == pytest.approx(1e-4 * max(1.0, r.max_abs_output)) and r.argmax_agreement == 1.0
    assert results["onnx"].opset >= 17
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left
    # the files themselves, read back independently, at another batch size (the batch dimension is dynamic)
    x64 = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        expected = model(x64)
        got_pt2 = torch.export.load(str(tmp_path / "m.pt2")).module()(x64)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got_onnx = session.run(None, {session.get_inputs()[0].name: x64.numpy()})[0]
    torch.testing.assert_close(got_pt2, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_onnx, expected.numpy(), rtol=1e-4, atol=1e-4)


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)  # not a function of its input: no export can match it


class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if float(x.sum()) > 0 else x  # data-dependent Python control flow: torch.export refuses it


def test_a_failed_export_or_check_is_reported_and_leaves_no_file(tmp_path):
    x = torch.randn(4, 3)
    with pytest.raises(ExportCheckError, match="pt2: max \\|pt2 - eager\\|"):
        export_model(_Noisy(), x, tmp_path / "noisy", "pt2")
    results = export_model(_Branchy(), x, tmp_path / "branchy", "pt2", strict=False)
    assert not results["pt2"].ok and results["pt2"].path is None and results["pt2"].error
    assert not list(tmp_path.iterdir())


def test_export_arguments_are_checked(tmp_path, monkeypatch):
    model, _ = _pruned_small_cnn()
    with pytest.raises(ValueError, match="unknown format.*'tflite'"):
        export_model(model, torch.randn(2, 1, 8, 8), tmp_path / "m", "onnx,tflite")
    with pytest.raises(ValueError, match="batch tensor"):
        export_model(model, [1, 2], tmp_path / "m", "pt2")
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    with pytest.raises(ImportError, match=r"\[export\] extra; missing: onnxruntime"):
        export_model(model, torch.randn(2, 1, 8, 8), tmp_path / "m", "onnx")
    with pytest.raises(ValueError, match="--export onnx needs the \\[export\\] extra"):
        PruneConfig(export="onnx").validate()


# ---------------------------------------------------------------------------------------------- latency
@pytest.mark.slow
def test_latency_is_compared_in_every_runtime_with_the_load_recorded():
    pruned, summary = _pruned_small_cnn()
    dense = build_model("small_cnn")
    table = compare_latency(dense, pruned, (1, 8, 8), batches=(3,), threads=(1,), repeats=3,
                            flops_ratio=summary.flops_ratio)  # one batch size and thread count: one compilation each
    assert table.skipped == {}
    assert [(r.runtime, r.batch_size, r.threads) for r in table.rows] == [
        ("eager", 3, 1), ("compile", 3, 1), ("onnxruntime", 3, 1)]
    for r in table.rows:
        assert 0 < r.dense_p20_ms <= r.dense_ms <= r.dense_p80_ms and 0 < r.pruned_p20_ms <= r.pruned_ms <= r.pruned_p80_ms
        assert r.speedup == pytest.approx(r.dense_ms / r.pruned_ms)
        assert r.gain_per_flops_gain == pytest.approx(r.speedup / summary.flops_ratio)
        assert r.samples == 3 and min(r.calls_per_sample.values()) >= 1
        assert r.others_cpu_percent is not None and r.others_cpu_percent >= 0 and r.load_1min is not None
    assert table.machine["cores"] and table.machine["torch"] == torch.__version__ and "onnxruntime" in table.machine
    assert torch.get_num_threads() >= 1 and not pruned.training  # the models given are not changed


def test_latency_skips_a_missing_runtime_and_checks_its_arguments(monkeypatch):
    pruned, _ = _pruned_small_cnn()
    import catalyst_fused.pruning.export as ex

    def missing(what="ONNX export"):
        raise ImportError(f"{what} needs the [export] extra; missing: onnxruntime")

    monkeypatch.setattr(ex, "require_export_extra", missing)
    threads = torch.get_num_threads()
    table = compare_latency(build_model("small_cnn"), pruned, (1, 8, 8), batches=(2,), threads=(1,), repeats=3,
                            runtimes="onnxruntime")
    assert [r.runtime for r in table.rows] == ["eager"] and "missing: onnxruntime" in table.skipped["onnxruntime"]
    assert torch.get_num_threads() == threads
    assert parse_runtimes("onnxruntime,eager") == ("eager", "onnxruntime") and parse_threads("2, 1") == (2, 1)
    for bad, match in (("tvm", "unknown runtime"),):
        with pytest.raises(ValueError, match=match):
            parse_runtimes(bad)
    for bad in ("0", "1,x", "", "1.5"):
        with pytest.raises(ValueError, match="positive integers"):
            parse_threads(bad)
    with pytest.raises(ValueError, match="repeats"):
        compare_latency(pruned, pruned, (1, 8, 8), repeats=1)


@pytest.mark.parametrize("kw, match", [
    (dict(export="onnx,gguf"), "--export: unknown format"), (dict(latency="eager,tvm"), "--latency: unknown runtime"),
    (dict(latency_threads="two"), "--latency-threads"), (dict(latency_repeats=2), "--latency-repeats"),
    (dict(round_to=0), "--round-to"),
])
def test_config_names_the_bad_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kw).validate()


# ---------------------------------------------------------------------------------------------- workflow
# c0 2 with kappa 0.1 decides every channel at once (mechanics, not quality): the rule prunes all but one per layer
TINY_CLI = ["--dense-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--gamma", "0.1", "--c0", "2",
            "--kappa", "0.1", "--train-limit", "256", "--test-limit", "64", "--latency-batch", "4", "--latency-repeats", "3",
            "--latency", "eager", "--latency-threads", "1", "--no-progress", "--no-plots"]


@pytest.mark.slow
def test_cli_writes_safe_files_and_exports_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["--out", str(out), "--round-to", "8"] + TINY_CLI) == 0
    report = Report.load(out / "report.json")
    assert report.exports is None and not (out / "pruned_model.onnx").exists()
    kept = report.per_layer_kept
    assert all(k % 8 == 0 for k in kept.values()) and sum(kept.values()) < 160, kept  # rounded, still pruned
    assert sum(v["rounded"] for v in report.stages.prune.per_layer.values()) > 0
    table = report.cost.latency_table
    assert [(r.runtime, r.batch_size, r.threads) for r in table.rows] == [("eager", 1, 1), ("eager", 4, 1)]
    assert report.cost.latency_ratio == table.row("eager", 4, 1).speedup
    assert table.flops_ratio == report.cost.flops_ratio
    history = list(report.history)

    # --resume on the finished run: export, without training again
    assert cli.main(["--out", str(out), "--resume", "--export", "onnx,pt2"]) == 0
    report = Report.load(out / "report.json")
    assert report.history == history and report.per_layer_kept == kept
    for fmt in ("onnx", "pt2"):
        r = report.exports[fmt]
        assert r["ok"] and r["path"] == str(out / f"pruned_model.{fmt}") and r["check_samples"] == 64, r
    assert report.config.latency == "eager"  # the saved measurement settings, where the call did not set them

    # every file the run wrote loads without running pickled code
    model = load_pruned("small_cnn", out)
    for path in sorted(out.iterdir()):
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix not in (".onnx", ".pt2", ".png") and path.name != ".lock":  # exports: checked below
            raise AssertionError(f"unexpected file {path.name}")
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "dense_model.pt", "pruned_model.safetensors",
                                                "pruned_model.json", "report.json", "pruned_model.onnx", "pruned_model.pt2"}
    # the exported model computes what the loaded one does, on real test images
    from catalyst_fused.data import load_dataset

    _, test, _ = load_dataset("digits", image_size=8, channels=1)
    x = torch.stack([test[i][0] for i in range(32)])
    session = ort.InferenceSession(str(out / "pruned_model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.eval()(x)
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected.numpy(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):  # a bad flag is a usage error naming it
        cli.main(["--out", str(out), "--resume", "--export", "tflite"])


def test_the_optional_dependencies_are_declared_and_pinned():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "safetensors" in extras["pruning"]  # the pruned model's weights file
    assert {"onnx", "onnxscript", "onnxruntime"} <= set(extras["export"]) and "catalyst_fused[export]" in extras["test"]
    pins = {line.split("==")[0] for line in (root / "requirements.txt").read_text().splitlines() if "==" in line}
    assert {"safetensors", "onnx", "onnxscript", "onnxruntime", "torch"} <= pins  # CI installs these
