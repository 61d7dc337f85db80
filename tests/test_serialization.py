"""The pruned model as safe files: save_pruned -> load_pruned round trips for every model the workflow supports
(and the bypass formulation), the spec's record of the original architecture, and clear errors for foreign,
truncated, modified or mismatched files."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import catalyst_fused as cf
from catalyst_fused.models import build_model
from catalyst_fused.pruning import PrunedModelError, load_pruned, read_pruned_spec, round_widths, save_pruned
from catalyst_fused.pruning.methods import Decision
from catalyst_fused.pruning.serialization import original_shapes

# every model the workflow builds by name, at a small input (ResNet-50 at 32x32: the trace and the surgery only)
MODELS = {"small_cnn": (1, 8, 8), "resnet56": (3, 32, 32), "vgg19_bn": (3, 32, 32), "resnet50": (3, 32, 32)}


def _randomize_(model):
    """Weights and BN statistics away from their initial values, so that equal outputs mean loaded weights."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.1)


def _pruned(name, *, formulation="regularizer", twice=True):
    """A model of ``name`` pruned by its pruner with random keep sets (twice: iterative pruning)."""
    torch.manual_seed(0)
    model = build_model(name)
    pruner = cf.Pruner(model, MODELS[name], formulation=formulation)
    with warnings.catch_warnings():  # no optimizer attached: nothing to narrow
        warnings.simplefilter("ignore", UserWarning)
        pruner.prune({t.name: torch.randperm(t.channels)[: max(1, t.channels // 3)] for t in pruner.targets})
        if twice:
            pruner.prune({t.name: torch.arange(0, t.channels, 2) for t in pruner.targets[:2]})
    _randomize_(model)
    return model.eval(), pruner


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_rebuilds_every_model_exactly(tmp_path, name):
    model, pruner = _pruned(name)
    original = {k: list(v.shape) for k, v in build_model(name).state_dict().items()}
    weights, spec_path = save_pruned(model, tmp_path / "pruned_model", pruner=pruner, builder={"name": name})
    assert weights.name == "pruned_model.safetensors" and spec_path.name == "pruned_model.json"
    spec = read_pruned_spec(tmp_path)
    assert spec["architecture"]["original_shapes"] == original  # recovered from the pruned shapes and the history
    assert spec["removals"] == json.loads(json.dumps(pruner.history))
    assert spec["widths"] and all(w["before"] != w["after"] for w in spec["widths"].values())
    x = torch.randn(2, *MODELS[name])
    with torch.no_grad():
        expected = model(x)
        for source in (build_model(name), lambda: build_model(name), name):  # instance, factory, name
            loaded = load_pruned(source, weights).eval()
            assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
            assert torch.equal(loaded(x), expected)
    # the weights file is plain safetensors: every tensor as saved, nothing else
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(weights).items())


def test_bypass_round_trip_needs_the_fold_first(tmp_path):
    model, pruner = _pruned("small_cnn", formulation="bypass", twice=False)
    with pytest.raises(ValueError, match="bypass.*fold"):
        save_pruned(model, tmp_path / "m", pruner=pruner)
    pruner.fold()
    save_pruned(model, tmp_path / "m", pruner=pruner)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_pruned(build_model("small_cnn"), tmp_path / "m").eval()(x), model.eval()(x))


def test_original_shapes_inverts_the_recorded_removals():
    model, pruner = _pruned("resnet56")
    now = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert original_shapes(now, pruner.history) == {k: list(v.shape) for k, v in build_model("resnet56").state_dict().items()}
    assert original_shapes(now, []) == now


def test_save_pruned_arguments_are_checked(tmp_path):
    model, pruner = _pruned("small_cnn", twice=False)
    with pytest.raises(ValueError, match="either the pruner"):
        save_pruned(model, tmp_path / "m")
    with pytest.raises(ValueError, match="another model"):
        save_pruned(build_model("small_cnn"), tmp_path / "m", pruner=pruner)
    # an unpruned model is a valid (empty) spec
    dense = build_model("small_cnn").eval()
    save_pruned(dense, tmp_path / "dense", removals=[])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_pruned(build_model("small_cnn"), tmp_path / "dense").eval()(x), dense(x))


@pytest.fixture
def saved(tmp_path):
    model, pruner = _pruned("small_cnn", twice=False)
    weights, spec = save_pruned(model, tmp_path / "pruned_model", pruner=pruner, builder={"name": "small_cnn"})
    return weights, spec


def test_truncated_or_modified_weights_are_rejected(saved):
    weights, _ = saved
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(PrunedModelError, match="truncated"):
        load_pruned("small_cnn", weights)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a weight's byte, same size
    weights.write_bytes(bytes(flipped))
    with pytest.raises(PrunedModelError, match="SHA-256 differs"):
        load_pruned("small_cnn", weights)


def test_an_edited_spec_is_rejected(saved):
    weights, spec_path = saved
    spec = json.loads(spec_path.read_text())
    spec["removals"][0]["keep"]["conv1"] = spec["removals"][0]["keep"]["conv1"][:-1]  # one channel less
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(PrunedModelError, match="modified after it was written"):
        load_pruned("small_cnn", weights)
    spec_path.write_text('{"format": "catalyst_fused.pruned_model/1", "architecture": ')  # truncated JSON
    with pytest.raises(PrunedModelError, match="not JSON"):
        load_pruned("small_cnn", weights)


def test_foreign_files_are_rejected(tmp_path, saved):
    weights, spec_path = saved
    (tmp_path / "report.json").write_text(json.dumps({"status": "done"}))
    with pytest.raises(PrunedModelError, match="not a pruning spec of catalyst_fused"):
        load_pruned("small_cnn", tmp_path / "report.json")
    # a safetensors file of someone else's, paired with our spec (size and digest made to match)
    save_file({"w": torch.zeros(3)}, str(weights))
    spec = json.loads(spec_path.read_text())
    import hashlib

    data = weights.read_bytes()
    spec["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(PrunedModelError, match="header format None"):
        load_pruned("small_cnn", weights)
    # the old pickled format is named, not unpickled
    old = tmp_path / "pruned_model.pt"
    torch.save({"model": build_model("small_cnn")}, old)
    with pytest.raises(PrunedModelError, match="pickled nn.Module"):
        load_pruned("small_cnn", old)
    with pytest.raises(FileNotFoundError, match="no pruning spec"):
        load_pruned("small_cnn", tmp_path / "missing")


def test_a_model_that_is_not_the_original_is_rejected(saved):
    weights, _ = saved
    with pytest.raises(PrunedModelError, match="saved from a catalyst_fused.models.cifar.SmallCNN but the model given is a"):
        load_pruned(build_model("resnet56"), weights)
    with pytest.raises(PrunedModelError, match="not the original architecture.*fc.weight"):
        load_pruned(build_model("small_cnn", num_classes=7), weights)
    pruned_already, _ = _pruned("small_cnn", twice=False)
    with pytest.raises(PrunedModelError, match="not the original architecture"):
        load_pruned(pruned_already, weights)
    with pytest.raises(PrunedModelError, match="not saved from a model built by name 'resnet56'"):
        load_pruned("resnet56", weights)
    with pytest.raises(TypeError, match="model_or_factory"):
        load_pruned(3, weights)
    with pytest.raises(TypeError, match="factory returned a int"):
        load_pruned(lambda: 3, weights)


def test_cf_load_pruned_is_the_public_entry(saved):
    weights, _ = saved
    assert cf.load_pruned is load_pruned
    assert isinstance(cf.load_pruned("small_cnn", weights.with_suffix("")), torch.nn.Module)


# ------------------------------------------------------------------------------------- width rounding
def _decision(stat, prune):
    stat, prune = torch.tensor(stat, dtype=torch.float64), torch.tensor(prune)
    return Decision("t", stat, prune, torch.zeros_like(prune))


def test_round_widths_keeps_the_least_pruned_extra_channels():
    # 10 channels, 3 kept (0, 1, 2); the pruned ones' statistics: channel 7 lowest, then 5, 9, ...
    stat = [0.0, 0.0, 0.0, 3.0, 4.0, 2.5, 6.0, 2.1, 5.0, 2.7]
    d = _decision(stat, [False] * 3 + [True] * 7)
    (r,) = round_widths([d], 4)
    assert r.keep.tolist() == [0, 1, 2, 7] and r.rounded == 1
    (r,) = round_widths([d], 8)
    assert r.keep.tolist() == [0, 1, 2, 3, 4, 5, 7, 9]  # + 7, 5, 9, 3, 4 (the five smallest statistics); 6 and 8 go
    assert r.rounded == 5
    (r,) = round_widths([d], 16)  # never more than the target has
    assert int((~r.prune).sum()) == 10 and r.rounded == 7
    assert round_widths([d], 1)[0] is d
    assert round_widths([_decision(stat, [False] * 8 + [True] * 2)], 8)[0].rounded == 0  # already a multiple
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to must be a positive integer"):
            round_widths([d], bad)


def test_pruner_round_to_gives_kernel_friendly_widths():
    torch.manual_seed(0)
    model = build_model("small_cnn")
    pruner = cf.Pruner(model, (1, 8, 8), c0=1.5, kappa=0.01, round_to=8)  # c0 > 1, tiny kappa: most channels go
    raw = pruner.decisions(round_to=1)
    rounded = pruner.decisions()
    assert [int((~d.prune).sum()) for d in rounded] == [min(d.channels, -(-int((~d.prune).sum()) // 8) * 8) for d in raw]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        summary = pruner.prune()
    assert all(v["kept"] % 8 == 0 for v in summary.per_target.values()), summary.per_target
    assert sum(v["rounded"] for v in summary.per_target.values()) > 0
    with pytest.raises(ValueError, match="round_to"):
        cf.Pruner(build_model("small_cnn"), (1, 8, 8), round_to=0)


@pytest.mark.parametrize("name", ["mobilenetv2_cifar", "vit_cifar"])
def test_depthwise_and_attention_models_round_trip(tmp_path, name):
    # Targets with depthwise rows, norm entries, free parameters and attention heads are replayed too.
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3)
    pruner = cf.Pruner(model, (3, 32, 32), mode="group", gamma=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner.prune({t.name: torch.arange(0, t.channels, 2) for t in pruner.targets})
    save_pruned(model, tmp_path / "m", pruner=pruner)
    torch.manual_seed(1)
    loaded = load_pruned(build_model(name, num_classes=10, in_channels=3), tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
