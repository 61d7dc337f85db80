"""Smoke tests: the overhead benchmark runs end to end and writes its CSV; every model builds and runs."""
from __future__ import annotations

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import catalyst_fused as cf
from catalyst_fused.models import MODEL_NAMES, build_model

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OVERHEAD = REPO_ROOT / "benchmarks" / "overhead.py"

EXPECTED_COLUMNS = {
    "date", "hostname", "cpu", "threads", "gpu", "python", "torch", "triton",
    "weight_set", "n_tensors", "n_params", "provider", "mode",
    "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "speedup_vs_compile", "ratio_vs_floor",
}  # fmt: skip


@pytest.mark.skipif(not cf.cpp_available(), reason="the compiled extension is not built")
def test_overhead_quick_writes_csv(tmp_path):
    out = tmp_path / "overhead.csv"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the Triton tests; the benchmark runs real code
    command = [
        sys.executable, str(OVERHEAD), "--quick",
        "--weight-sets", "resnet56", "--providers", "eager,cpp,cpp_inplace",
        "--reps", "3", "--warmup", "1", "--rounds", "1", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "resnet56: 57 tensors, 850,864 params" in result.stdout
    assert "skip cpp_inplace/forward" in result.stdout

    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert EXPECTED_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)
    got = sorted((r["provider"], r["mode"]) for r in rows)
    assert got == sorted(
        [("eager", "forward"), ("eager", "full"), ("cpp", "forward"), ("cpp", "full"), ("cpp_inplace", "full"),
         ("floor", "forward"), ("floor", "full")]
    )  # fmt: skip
    for r in rows:
        assert r["weight_set"] == "resnet56"
        assert int(r["n_tensors"]) == 57 and int(r["n_params"]) == 850_864
        for key in ("median_ms", "p20_ms", "p80_ms", "ratio_vs_floor", "speedup_vs_eager"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (r["provider"], r["mode"], key, r[key])
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["speedup_vs_compile"] == ""  # compile was not run
    eager_full = next(r for r in rows if r["provider"] == "eager" and r["mode"] == "full")
    assert float(eager_full["speedup_vs_eager"]) == pytest.approx(1.0)

    assert {r["cache"] for r in rows} == {"hot"}

    # A second run appends to the same file under the same header; --cold evicts the cache before every
    # repetition and says so in the CSV.
    command[command.index("eager,cpp,cpp_inplace")] = "cpp"
    result = subprocess.run(command + ["--modes", "full", "--cold"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "cache: cold" in result.stdout
    with open(out, newline="") as f:
        appended = list(csv.DictReader(f))[len(rows):]
    assert sorted((r["provider"], r["mode"]) for r in appended) == [("cpp", "full"), ("floor", "full")]
    assert {r["cache"] for r in appended} == {"cold"}


@pytest.mark.skipif(not cf.cpp_available(), reason="the compiled extension is not built")
def test_overhead_group_set_with_torch_pruning_and_pruner(tmp_path):
    # A group-layout set built from a real model, with Torch-Pruning's regularizer and our pruner object on
    # the same model.
    pytest.importorskip("torch_pruning")
    pytest.importorskip("torchvision")
    out = tmp_path / "overhead.csv"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    command = [
        sys.executable, str(OVERHEAD), "--weight-sets", "mobilenet_v2_group",
        "--providers", "eager,cpp,cpp_inplace,pruner,torch_pruning", "--modes", "full",
        "--reps", "2", "--warmup", "1", "--rounds", "1", "--max-seconds", "0.1", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "mobilenet_v2_group: 157 tensors" in result.stdout  # the groups through its depthwise convolutions too
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == {"floor", "eager", "cpp", "cpp_inplace", "pruner", "torch_pruning"}
    assert by_provider["torch_pruning"]["grads"] == "zeros" and by_provider["cpp"]["grads"] == "none"
    assert by_provider["pruner"]["grads"] == "zeros"
    for r in rows:
        assert int(r["n_params"]) == 3_503_872 and int(r["n_rows"]) == 9_128  # groups of the layout
        assert float(r["median_ms"]) > 0 and math.isfinite(float(r["ratio_vs_floor"]))


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("resnet56", (1, 3, 32, 32), 10),
        ("vgg19_bn", (1, 3, 32, 32), 100),
        ("resnet50", (1, 3, 32, 32), 1000),
        ("small_cnn", (1, 1, 8, 8), 10),
    ],
)
def test_build_model_forward(name, shape, classes):
    model = build_model(name).eval()  # eval: BatchNorm on a 1-sample, 1x1 map needs running statistics
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.shape == (1, classes)
    assert torch.isfinite(out).all()


def test_build_model_arguments():
    model = build_model("small_cnn", num_classes=3, in_channels=2)
    assert model(torch.randn(2, 2, 8, 8)).shape == (2, 3)
    model = build_model("resnet56", num_classes=7, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 57  # stem + 54 block convs + 2 option-B shortcut convs
    model = build_model("vgg19_bn", num_classes=10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 16
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="resnet56.*vgg19_bn.*resnet50.*small_cnn"):
        build_model("resnet18")
    assert set(MODEL_NAMES) == {"resnet56", "vgg19_bn", "resnet50", "small_cnn", "mobilenetv2_cifar", "vit_cifar"}
