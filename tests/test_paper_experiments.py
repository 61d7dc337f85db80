"""Issue 10's experiment scripts in their smoke setting: the function-preserving rescaling test of the
magnitude-bias claim (experiments/rescaling_bias.py). Figures at smoke budgets mean nothing; what is checked is
that the rescaling leaves the function unchanged, that every method ran on both models to the target, and that
the table and the numbers are written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rescaling_bias_experiment_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = tmp_path / "results"
    command = [sys.executable, str(REPO_ROOT / "experiments" / "rescaling_bias.py"), "--setting", "smoke",
               "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(results)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    data = json.loads((results / "rescaling_bias_smoke.json").read_text())
    assert data["setting"] == "smoke"
    records = data["records"]
    assert [r["method"] for r in records] == ["catalyst-group", "catalyst-bn", "slimming", "group_lasso"]
    for r in records:
        assert r["max_logit_change_of_rescaling"] < 1e-4, r  # the rescaled model computes the same function
        assert r["channels_rescaled"] > 0
        for key in ("rho_log_s_vs_pruned", "rho_log_s_vs_pruned_unscaled_run"):
            assert math.isnan(r[key]) or -1.0 <= r[key] <= 1.0, r
        assert 0.0 <= r["agreement"] <= 1.0
        for key in ("flops_unscaled", "flops_rescaled"):  # both runs reached the 1.5x target
            assert r[key] == pytest.approx(1.5, rel=0.1), r
    md = (results / "rescaling_bias_smoke.md").read_text()
    for r in records:
        assert f"| {r['method']} | 1 |" in md


def _paper_table(tmp_path, runs, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = tmp_path / "results"
    command = [sys.executable, str(REPO_ROOT / "experiments" / "paper_table.py"), "--setting", "smoke",
               "--runs-dir", str(runs), "--results-dir", str(results), *extra]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads((results / "paper_table_smoke.json").read_text()), (results / "paper_table_smoke.md").read_text(), done.stdout


@pytest.mark.slow
def test_paper_table_smoke_and_its_partial_tables(tmp_path):
    # nothing made yet: --finished-only makes no run and says what is missing
    data, md, out = _paper_table(tmp_path, tmp_path / "runs", "--finished-only")
    assert data["records"] == [] and "not made yet: small_cnn seed 0 (dense)" in out
    assert "**Partial**, not made yet: small_cnn seed 0 (dense)" in md
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("report.json"))
    data, md, _ = _paper_table(tmp_path, tmp_path / "runs")
    records = data["records"]
    assert [(r["mode"], r["method"]) for r in records] == [
        (mode, method) for mode in ("group", "bn") for method in ("catalyst", "slimming", "random")]
    for mode in ("group", "bn"):
        cat, *baselines = [r for r in records if r["mode"] == mode]
        assert cat["flops_ratio"] == pytest.approx(1.5, rel=0.1), cat
        for b in baselines:  # pruned to the FLOPs ratio that Catalyst reached
            assert b["flops_ratio"] >= cat["flops_ratio"] * 0.97, (b, cat)
        assert "**Partial**" not in md and f"| small_cnn | 1.5x | {mode} | catalyst | 1 |" in md
    # the finished runs are read back, not made again
    again, md, out = _paper_table(tmp_path, tmp_path / "runs", "--finished-only")
    assert again["records"] == records and "not made yet" not in out and "**Partial**" not in md  # complete
    # the ledger outlives the runs directory: with the runs gone, the table is read back from it, and a run
    # missing from it is made again from a dense model remade bit for bit (the ledger keeps no weights)
    ledger = tmp_path / "results" / "ledger"
    filed = sorted(p.parent.name for p in ledger.rglob("provenance.json"))
    assert len(filed) == 7 and sum(name.startswith("dense-") for name in filed) == 1, filed
    import shutil
    shutil.rmtree(tmp_path / "runs")
    from_ledger, _, out = _paper_table(tmp_path, tmp_path / "runs", "--finished-only")
    assert from_ledger["records"] == records and "not made yet" not in out
    # a damaged entry is named, not read as garbage
    slimming_bn = next(p.parent for p in ledger.rglob("provenance.json") if p.parent.name.startswith("slimming-bn-"))
    good = (slimming_bn / "report.json.gz").read_bytes()
    (slimming_bn / "report.json.gz").write_bytes(good[: len(good) // 2])
    damaged = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "paper_table.py"), "--setting", "smoke",
                              "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
                              "--finished-only"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert damaged.returncode != 0 and f"{slimming_bn}: this ledger entry's report.json.gz cannot be read" in damaged.stderr
    (slimming_bn / "report.json.gz").write_bytes(good)
    random_bn = next(p.parent for p in ledger.rglob("provenance.json") if p.parent.name.startswith("random-bn-"))
    shutil.rmtree(random_bn)
    remade, md, out = _paper_table(tmp_path, tmp_path / "runs", "--methods", "random", "--modes", "bn")
    assert "dense model remade bit for bit" in out and out.count("run: ") == 2, out  # the dense model, then random
    (row,) = remade["records"]
    expected = next(r for r in records if (r["mode"], r["method"]) == ("bn", "random"))
    assert {k: v for k, v in row.items() if k != "wall_s"} == {k: v for k, v in expected.items() if k != "wall_s"}
    assert "Not comparable" not in md
    # a dense model filed from another machine whose weights a remake does not reproduce: the remake says so and
    # names both machines (the filed SHA is altered here to stand for that machine's weights)
    dense_entry = next(p for p in ledger.rglob("provenance.json") if p.parent.name.startswith("dense-"))
    provenance = json.loads(dense_entry.read_text())
    provenance["weights_sha256"] = "0" * 64
    provenance["environment"].update(processor="Another CPU", cpu_capability="AVX2", threads=4)
    dense_entry.write_text(json.dumps(provenance))
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(next(p.parent for p in ledger.rglob("provenance.json") if p.parent.name.startswith("random-bn-")))
    _, _, out = _paper_table(tmp_path, tmp_path / "runs", "--methods", "random", "--modes", "bn")
    assert "WARNING: the dense model remade" in out and "made on Another CPU, AVX2, threads 4" in out, out
