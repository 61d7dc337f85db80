"""Packaging: the kernels import without the workflow's dependencies; the pruner and the CLI name the
[pruning] extra when one is missing; the declared torch range covers the versions we build against."""
import importlib.util
import pathlib
import subprocess
import sys


from catalyst_fused import prune as cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_core_package_imports_without_the_pruning_extra():
    code = ("import sys, catalyst_fused as cf; "
            "assert not any(m in sys.modules for m in ('torch_pruning', 'torchvision', 'sklearn', 'matplotlib')), "
            "[m for m in ('torch_pruning', 'torchvision', 'sklearn', 'matplotlib') if m in sys.modules]")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_cli_names_the_extra_when_a_package_is_missing(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_pruning" else real(name, *a))
    assert cli.main(["--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "catalyst_fused[pruning]" in err and "torch-pruning" in err


def test_the_declared_dependencies():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch>=2.11,<2.14" in project["dependencies"] and "numpy" in project["dependencies"]
    assert not any(d.startswith(("torch-pruning", "torchvision", "scikit-learn")) for d in project["dependencies"])
    pruning = project["optional-dependencies"]["pruning"]
    for name in ("torch-pruning", "torchvision", "scikit-learn", "tqdm", "matplotlib"):
        assert any(d.startswith(name) for d in pruning), name
