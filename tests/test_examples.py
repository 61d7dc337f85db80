"""The examples run as a user would run them (their smoke settings)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_torchvision_example_trains_and_prunes_through_the_public_pruner():
    script = ROOT / "examples" / "prune_torchvision.py"
    # the example uses the package's top level only: no private (or any sub-module) import
    imports = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
    ours = [line for line in imports if "catalyst_fused" in line]
    assert ours == ["import catalyst_fused as cf"], ours
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("dense: ") and any(line.startswith("pruned ") for line in lines)
    assert lines[-1].startswith("fine-tuned: ")
