"""Pruning under DDP on CPU (gloo, 2 processes): the pruner through DistributedDataParallel against one
process with the same global batch, the CLI under torchrun against a single-process run, and a run whose
rank is killed mid-way and resumed."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from torch import nn

import catalyst_fused as cf
from catalyst_fused.pruning import distributed

from _distributed import PYTHON, free_port, launcher_env, python_env, spawn

# The digits run of the CLI tests: a barely trained small CNN (dense ~89% on 128 test digits) that a strong
# penalty prunes to one channel per layer (157 of 160 channels; which channel each layer keeps is decided
# by the catalysts). It checks the mechanics of N processes against one, not pruning quality.
CLI_ARGS = ["--dense-epochs", "3", "--epochs", "8", "--finetune-epochs", "1", "--lr", "0.1", "--gamma", "0.05", "--c0", "1.5",
            "--kappa", "1", "--train-limit", "768", "--test-limit", "128", "--batch-size", "32", "--no-plots",
            "--latency-batch", "4", "--noise-draws", "1"]


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(96, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :4].argmax(1)))


def _train(model, pruner, loader, opt):
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.regularize()
        opt.step()


def _pruner_worker(rank, world):
    data = _data()

    def setup():
        model = _mlp()
        pruner = cf.Pruner(model, torch.zeros(2, 8), gamma=0.05, c0=3.0, kappa=0.5, ignored_layers=[model[4]])
        opt = torch.optim.SGD(pruner.param_groups(lr=0.2, momentum=0.9), lr=0.2)
        pruner.attach_optimizer(opt)
        return model, pruner, opt

    # one process, global batch 32
    single, p1, o1 = setup()
    for epoch in range(4):
        from catalyst_fused.data import make_loader

        _train(single, p1, make_loader(data, 32, shuffle=True, seed=epoch), o1)
    # the same under DDP: each rank 16 of every global batch of 32
    model, pruner, opt = setup()
    for epoch in range(4):
        _train(distributed.training_model(model), pruner, distributed.epoch_loader(data, 32, epoch), opt)
    for a, b in zip(pruner.catalysts, p1.catalysts):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    # catalysts that only the penalty touches are identical on every rank without being communicated
    for d in pruner.catalysts:
        other = d.detach().clone()
        torch.distributed.broadcast(other, src=0)
        assert torch.equal(other, d.detach())
    mine = {d.target: d.keep.tolist() for d in pruner.decisions()}
    assert mine == {d.target: d.keep.tolist() for d in p1.decisions()}
    for a, b in zip(pruner.scores(), p1.scores()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # remove the half of each layer with the largest statistic (the rule's decisions need more training than
    # this test runs; the ranking is what DDP must reproduce)
    ranked = {t.name: torch.argsort(s)[: t.channels // 2].sort().values for t, s in zip(pruner.targets, pruner.scores())}
    # ranks that disagree remove nothing and all say so
    shapes = [tuple(p.shape) for p in model.parameters()]
    keep = {pruner.targets[0].name: [0] if rank == 0 else [1]}
    with pytest.raises(RuntimeError, match=r"ranks \[1\] disagree with rank 0"):
        pruner.prune(keep)
    assert [tuple(p.shape) for p in model.parameters()] == shapes
    wrapper = distributed.training_model(model)
    pruner.prune(ranked)
    rebuilt = distributed.training_model(model)
    assert rebuilt is not wrapper and rebuilt.module is model  # new parameters: a new DDP wrapper
    _train(rebuilt, pruner, distributed.epoch_loader(data, 32, 9), opt)  # the attached optimizer follows
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    other = weights.clone()
    torch.distributed.broadcast(other, src=0)
    assert torch.equal(other, weights)
    assert distributed.environment() == {"world_size": 2, "backend": "gloo"}


def test_the_pruner_under_ddp_matches_one_process_with_the_same_global_batch():
    spawn(_pruner_worker, world=2, timeout=240)


def test_epoch_shares_partition_the_single_process_batches():
    batches = distributed.global_batches(10, 4, seed=3)
    from catalyst_fused.data import make_loader

    assert batches == [b.tolist() for b in make_loader(list(range(10)), 4, shuffle=True, seed=3)]
    assert sorted(i for b in batches for i in b) == list(range(10))


# ------------------------------------------------------------------------------------------------ CLI
def _torchrun(out, *extra, nproc=2):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "catalyst_fused.prune", "--out", str(out), *CLI_ARGS, *extra]
    done = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = _torchrun(out)
    return out, done


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_torchrun_cli_decides_as_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    out, done = ddp_run
    single = tmp_path / "single"
    ran = subprocess.run([PYTHON, "-m", "catalyst_fused.prune", "--out", str(single), "--no-progress", *CLI_ARGS],
                         env=python_env(), capture_output=True, text=True, timeout=400)
    assert ran.returncode == 0, ran.stderr[-3000:]
    ddp, one = _report(out), _report(single)
    assert ddp["environment"]["world_size"] == 2 and ddp["environment"]["backend"] == "gloo"
    assert one["environment"]["world_size"] == 1
    # rank 0 alone logs: every line once
    assert done.stdout.count("prune: removed") == 1
    a, b = ddp["stages"]["prune"]["channels"]["pruned"], one["stages"]["prune"]["channels"]["pruned"]
    assert 0 < sum(a) < len(a) and 0 < sum(b) < len(b)  # a real decision, not all-or-nothing
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    # BatchNorm statistics come from each rank's half of the batch (SyncBatchNorm is GPU-only): the runs are
    # not bit-identical, so decisions of channels near the threshold can differ
    assert agree >= 0.9, (agree, ddp["per_layer_kept"], one["per_layer_kept"])
    assert ddp["accuracy"]["dense"] > 50 and abs(ddp["accuracy"]["dense"] - one["accuracy"]["dense"]) <= 10.0
    assert abs(ddp["accuracy"]["after_finetune"] - one["accuracy"]["after_finetune"]) <= 15.0
    assert sorted(os.listdir(out)) == sorted(os.listdir(single))  # the same files, written once


def test_a_killed_rank_resumes_to_the_uninterrupted_result(ddp_run, tmp_path):
    reference, _ = ddp_run
    out = tmp_path / "killed"
    port = free_port()

    def launch(*extra):
        procs = []
        for r in range(2):
            env = {**python_env(), **launcher_env(r, 2, port)}
            log = open(tmp_path / f"rank{r}.log", "a")
            procs.append(subprocess.Popen([PYTHON, "-m", "catalyst_fused.prune", "--out", str(out), *CLI_ARGS, *extra],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        return procs

    procs = launch()
    deadline = time.monotonic() + 300
    while "opt1 1/" not in (tmp_path / "rank0.log").read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-2000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    try:
        code = procs[0].wait(timeout=120)  # gloo reports the lost peer
    except subprocess.TimeoutExpired:
        procs[0].kill()
        code = procs[0].wait()
    assert code != 0 and not (out / "report.json").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["stage"] == "opt1"  # the run resumes in the middle of the sparsity stage
    port = free_port()
    procs = launch("--resume")
    for p in procs:
        assert p.wait(timeout=400) == 0, (tmp_path / "rank0.log").read_text()[-3000:]
    resumed, full = _report(out), _report(reference)
    assert resumed["stages"]["prune"]["channels"] == full["stages"]["prune"]["channels"]
    assert resumed["accuracy"] == full["accuracy"]
