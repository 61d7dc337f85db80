"""Catalyst pruning of a torchvision ResNet-18 in a plain PyTorch training loop, through the public pruner.

    python examples/prune_torchvision.py              # ~5 min on 2 CPU cores
    python examples/prune_torchvision.py --smoke      # seconds: a few batches per stage (what the tests run)

Data: the real handwritten digits that ship with scikit-learn (1,797 8x8 images), upsampled to 32x32 RGB.
Nothing here uses the library's private modules or its workflow: the model, the data, the loops and the
optimizers are the user's; Catalyst is a few calls (regularize, after_step, all_decided, prune), with gamma
picked from the step budget and a target FLOPs reduction reached in the one sparsity run; accuracies are
measured after re-estimating the BatchNorm statistics (recalibrate_bn), which lag the shrinking weights.
"""
from __future__ import annotations

import argparse

import torch
import torchvision
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import catalyst_fused as cf


def digits(size: int = 32):
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(bunch.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[perm[:1400]], y[perm[:1400]]), TensorDataset(x[perm[1400:]], y[perm[1400:]])


def accuracy(model, loader, train_loader=None) -> float:
    if train_loader is not None:  # BN statistics re-estimated on 8 training batches first
        cf.recalibrate_bn(model, train_loader, batches=8)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return 100.0 * correct / len(loader.dataset)


def train(model, loader, optimizer, epochs, max_steps, pruner=None):
    criterion = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        for step, (x, y) in enumerate(loader):
            if step == max_steps:
                break
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            if pruner is not None:
                pruner.regularize()      # gamma * dR/dW and dR/dd into the gradients, one fused call
            optimizer.step()
            if pruner is not None:
                pruner.after_step()      # freezes decided channels, tracks the threshold, steers to the target
        if pruner is not None:
            s = pruner.stats()
            print(f"  catalyst epoch {epoch + 1}: decided {100 * s.fraction_decided:.0f}%, u > 1: "
                  f"{100 * s.fraction_above_zero:.0f}%")
            if pruner.all_decided():     # every channel decided: removing the pruned ones is lossless
                break


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few batches per stage (tests)")
    p.add_argument("--dense-epochs", type=int, default=4)
    p.add_argument("--catalyst-epochs", type=int, default=15)
    p.add_argument("--target-speedup", type=float, default=2.0)
    p.add_argument("--finetune-epochs", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    max_steps = 2 if args.smoke else None
    train_set, test_set = digits()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    calib_loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))
    test_loader = DataLoader(test_set, batch_size=256)

    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train(model, loader, optimizer, 1 if args.smoke else args.dense_epochs, max_steps)
    print(f"dense: {accuracy(model, test_loader, calib_loader):.2f}%")

    # Catalyst on the BatchNorm scales of every coupled channel group (BN mode), from the dense weights: gamma
    # from the step budget, the undecided catalysts steered to the target FLOPs reduction during the run.
    epochs = 1 if args.smoke else args.catalyst_epochs
    steps = epochs * (max_steps or len(loader))
    pruner = cf.Pruner(model, torch.randn(1, 3, 32, 32), mode="bn", gamma="auto", budget_steps=steps,
                       target_speedup=args.target_speedup, ignored_layers=[model.fc])
    optimizer = torch.optim.SGD(pruner.param_groups(lr=0.01, momentum=0.9, weight_decay=5e-4))
    pruner.attach_optimizer(optimizer)   # resolves gamma; prune() hands it the narrower parameters
    forecast = pruner.predictions()
    print(f"gamma {pruner.gamma:.3g} (auto): a channel 2% off the threshold decides after "
          f"~{forecast['steps_to_decide_offset']['steps']:.0f} of {steps} steps; the rest are decided by their side "
          f"at step {forecast['force_step']}")
    train(model, loader, optimizer, epochs, max_steps, pruner)
    before = accuracy(model, test_loader, calib_loader)
    summary = pruner.prune()             # in place: the same model object, narrower layers
    print(f"pruned {summary.channels_pruned}/{summary.channels_total} channels ({summary.undecided_total} undecided "
          f"kept), FLOPs {summary.flops_ratio:.2f}x, params {summary.params_ratio:.2f}x; accuracy {before:.2f}% -> "
          f"{accuracy(model, test_loader, calib_loader):.2f}% at removal")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    train(model, loader, optimizer, 1 if args.smoke else args.finetune_epochs, max_steps)
    print(f"fine-tuned: {accuracy(model, test_loader, calib_loader):.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
