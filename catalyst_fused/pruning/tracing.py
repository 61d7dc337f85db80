"""Channel tracking: which dimension of every activation carries a group's channels, and whether every
operation on the way keeps them apart.

Torch-Pruning's ``DependencyGraph`` says which layers are coupled, but it treats every operation it does not
know as element-wise and does not say along which dimension the channels travel. :func:`record` runs one
forward pass under a ``TorchFunctionMode`` and keeps every call (function name, arguments, the shapes of
its tensors, the innermost module running it); :func:`follow` then walks forward from a group's sources
(producer outputs, free parameters) through the recorded calls in execution order, tracking the channel
dimension (as a negative index, so that broadcasting keeps it) and its *width* (consecutive indices per
channel: a flattened ``C x H x W`` map gives ``H * W`` input columns per channel). Every call a group's
channels pass must be one whose effect on them is known (see ``_RULES``): channel-wise arithmetic and
activations, pooling over other dimensions, reshapes and permutations that keep the channel dimension whole
(or flatten it as the leading factor), concatenation, indexing of other dimensions. Anything else (a
reduction or softmax over the channels, a split of them, a matrix product over them, an unknown function)
is a reason to exclude the group.

Layers end a path as consumers (a ``Linear`` / convolution reading the channels as its inputs, an
``nn.MultiheadAttention`` reading them as its embedding) or pass the channels on (BatchNorm, LayerNorm /
RMSNorm, depthwise convolutions). Modules whose forward is a sequence of small operations with a known
overall effect (RMSNorm-style modules, ``nn.MultiheadAttention``) are recorded as one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.overrides import TorchFunctionMode

__all__ = ["Call", "Trace", "Flow", "record", "follow", "is_rms_norm", "NORM_TYPES"]


def is_rms_norm(module: nn.Module) -> bool:
    """An RMSNorm-style module: ``torch.nn.RMSNorm`` or a class named ``*RMSNorm`` / ``*RmsNorm`` (Llama, Qwen,
    T5, timm, ...) with a 1-D ``weight`` and no other parameter than a 1-D ``bias``: it normalises its last
    dimension and scales it entry by entry."""
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    if "rmsnorm" not in type(module).__name__.lower():
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.pop("weight", None)
    bias = params.pop("bias", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and not params
            and (bias is None or bias.shape == weight.shape) and not list(module.children()))


NORM_TYPES = (nn.LayerNorm,)


def _collapsed(module: nn.Module) -> bool:
    """Modules recorded as one call (their inner operations are not followed one by one)."""
    return isinstance(module, nn.MultiheadAttention) or is_rms_norm(module)


def _key(t: torch.Tensor):
    fn = t.grad_fn
    return (id(fn), t.output_nr) if fn is not None else ("leaf", id(t))


@dataclass
class _T:
    """A tensor argument of a recorded call: ``inputs[index]``."""

    index: int


@dataclass
class Call:
    """One recorded call. ``args``/``kwargs`` hold non-tensor values as given and :class:`_T` in place of
    tensors; ``inputs``/``outputs`` are ``(key, shape)`` per tensor."""

    index: int
    name: str
    args: tuple
    kwargs: dict
    inputs: list
    outputs: list
    module: Optional[str]  # innermost module running the call (for collapsed modules: the module itself)
    params: dict = field(default_factory=dict)  # input index -> qualified parameter name

    def arg(self, position: int, name: str, default=None):
        if len(self.args) > position:
            return self.args[position]
        return self.kwargs.get(name, default)

    def shape(self, ref) -> Optional[tuple]:
        return self.inputs[ref.index][1] if isinstance(ref, _T) else None


@dataclass
class Trace:
    calls: list
    outputs: set  # keys of the model's output tensors
    module_inputs: dict  # module name -> keys of its (first call's) tensor inputs
    keep_alive: list = field(repr=False, default_factory=list)


def _flatten(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flatten(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flatten(o, out)
    elif hasattr(obj, "to_tuple") and callable(obj.to_tuple):  # Hugging Face ModelOutput
        _flatten(obj.to_tuple(), out)


def _name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return name.strip("_") if name.startswith("_") and not name.startswith("__") else name


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.calls: list[Call] = []
        self.stack: list[nn.Module] = []
        self.collapsed: Optional[tuple] = None  # (module, depth, inputs, param refs) while one is running
        self.module_inputs: dict = {}
        self.keep_alive: list = []

    # ------------------------------------------------------------------------------------- modules
    def pre_hook(self, module, args):
        self.stack.append(module)
        tensors: list = []
        _flatten(args, tensors)
        name = self.names.get(module)
        if name is not None and name not in self.module_inputs:
            self.module_inputs[name] = [_key(t) for t in tensors]
        if self.collapsed is None and name is not None and _collapsed(module):
            self.collapsed = (module, len(self.stack), [(_key(t), tuple(t.shape)) for t in tensors], tensors)

    def hook(self, module, args, output):
        if self.collapsed is not None and self.collapsed[0] is module and self.collapsed[1] == len(self.stack):
            _, _, inputs, tensors = self.collapsed
            self.collapsed = None
            outs: list = []
            _flatten(output, outs)
            self.keep_alive.extend(tensors + outs)
            self.calls.append(Call(len(self.calls), "module:" + type(module).__name__, (), {}, inputs,
                                   [(_key(t), tuple(t.shape)) for t in outs], self.names[module]))
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    # ----------------------------------------------------------------------------------- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.collapsed is not None:
            return func(*args, **kwargs)
        inputs: list = []
        params: dict = {}

        def strip(obj):
            if isinstance(obj, torch.Tensor):
                if isinstance(obj, nn.Parameter) and id(obj) in self.param_names:
                    params[len(inputs)] = self.param_names[id(obj)]
                inputs.append((_key(obj), tuple(obj.shape)))
                self.keep_alive.append(obj)
                return _T(len(inputs) - 1)
            if isinstance(obj, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in obj):
                return type(obj)(strip(o) for o in obj) if not hasattr(obj, "_fields") else obj
            return obj

        s_args = tuple(strip(a) for a in args)
        s_kwargs = {k: strip(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        outs: list = []
        _flatten(out, outs)
        outs = [t for t in outs if t.grad_fn is not None]
        if outs and inputs:
            self.keep_alive.extend(t.grad_fn for t in outs)
            module = self.names.get(self.stack[-1]) if self.stack else None
            self.calls.append(Call(len(self.calls), _name(func), s_args, s_kwargs, inputs,
                                   [(_key(t), tuple(t.shape)) for t in outs], module, params))
        return out


class record:
    """Context manager recording every call of one forward pass of ``model`` (run inside it)::

        with record(model) as rec:
            out = model(x)
            rec.set_outputs(out)
        trace = rec.trace
    """

    def __init__(self, model: nn.Module):
        self._rec = _Recorder(model)
        self._handles: list = []
        self._outputs: set = set()
        self.trace: Optional[Trace] = None

    def set_outputs(self, out) -> list:
        """Records the model's outputs; returns its tensors as a list (what DepGraph walks back from)."""
        tensors: list = []
        _flatten(out, tensors)
        self._outputs |= {_key(t) for t in tensors}
        self._rec.keep_alive.extend(tensors)
        return tensors

    def __enter__(self) -> "record":
        self._handles = [_module_hooks.register_module_forward_pre_hook(self._rec.pre_hook),
                         _module_hooks.register_module_forward_hook(self._rec.hook, always_call=True)]
        self._rec.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._rec.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self.trace = Trace(self._rec.calls, self._outputs, self._rec.module_inputs, self._rec.keep_alive)


# --------------------------------------------------------------------------------------------- flow
@dataclass(frozen=True)
class _State:
    dim: int  # negative: counted from the last dimension
    width: int = 1


@dataclass
class Flow:
    """What :func:`follow` found: the layers the channels reach, by role."""

    consumers: dict = field(default_factory=dict)  # module -> width (weight dim 1 of a Linear/conv)
    grouped: dict = field(default_factory=dict)  # module -> (in_channels, groups) of a grouped conv consumer
    bns: set = field(default_factory=set)
    norms: dict = field(default_factory=dict)  # module -> channel dimension of the module's input
    depthwise: set = field(default_factory=set)
    attention_inputs: set = field(default_factory=set)  # nn.MultiheadAttention read as embedding
    outputs: bool = False  # the channels reach a model output


class _Excluded(Exception):
    pass


def _norm_dim(d: int, rank: int) -> int:
    """``d`` (any sign) as a negative index into a ``rank``-D tensor."""
    if not -rank <= d < rank:
        raise _Excluded(f"dimension {d} out of range for a {rank}-D tensor")
    return d - rank if d >= 0 else d


_POINTWISE = frozenset("""
relu relu_ relu6 hardtanh hardtanh_ gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid
hardsigmoid_ leaky_relu leaky_relu_ elu elu_ selu celu mish softplus dropout dropout_ alpha_dropout feature_alpha_dropout
dropout1d dropout2d dropout3d clone contiguous to float half double bfloat16 type type_as neg neg_ __neg__ abs
__abs__ exp log sqrt rsqrt square pow pow_ __pow__ clamp clamp_ clamp_min clamp_max erf sin cos reciprocal
nan_to_num logsigmoid gelu_ detach_ requires_grad_ identity
""".split())
_BINARY = frozenset("""
add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub mul mul_ __mul__ __rmul__ __imul__
div div_ __truediv__ __rtruediv__ __itruediv__ true_divide maximum minimum where addcmul lerp masked_fill
masked_fill_ __and__ __or__
""".split())
_REDUCE = frozenset("mean sum amax amin max min std var logsumexp norm prod nansum nanmean".split())
_POOL = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
         "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
         "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "max_pool2d_with_indices": 2,
         "adaptive_max_pool2d_with_indices": 2, "lp_pool2d": 2}
_RESHAPE = frozenset("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze squeeze_ unsqueeze_".split())
_SPLIT = frozenset("split chunk unbind tensor_split split_with_sizes unsafe_split unsafe_chunk".split())
_SELECT = frozenset("select narrow index_select gather take_along_dim".split())


def _reshape(s: _State, shape_in: tuple, shape_out: tuple) -> _State:
    """The channel dimension after a reshape from ``shape_in`` to ``shape_out``: kept whole, or flattened as the
    leading factor of a merged dimension (the width grows by the merged size); anything else excludes."""
    rank = len(shape_in)
    pos = rank + s.dim
    size = shape_in[pos]
    before = math.prod(shape_in[:pos])
    prefix = 1
    for j, n in enumerate(shape_out):
        if prefix == before:
            if n >= size and n % size == 0:
                merged = n // size
                inner, k = 1, pos + 1  # the merged factor must be exactly the next input dimensions
                while inner < merged and k < rank:
                    inner *= shape_in[k]
                    k += 1
                if inner == merged:
                    return _State(j - len(shape_out), s.width * merged)
                break
            if n != 1:
                raise _Excluded(f"splits the {size} channels (dimension {pos} of {tuple(shape_in)}) into "
                                f"{tuple(shape_out)}")
        elif prefix > before:
            break
        prefix *= n
    raise _Excluded(f"reshapes the channels (dimension {pos} of {tuple(shape_in)}) into {tuple(shape_out)} as an inner "
                    "dimension")


def _dims_arg(value, rank: int) -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, int):
        return [_norm_dim(value, rank)]
    return [_norm_dim(int(v), rank) for v in value]


def _rule(call: Call, tracked: dict, flow: Flow, modules: dict) -> dict:
    """Output index -> state for one call whose inputs ``tracked`` (input index -> state) carry the channels.
    Records reached layers in ``flow``; raises :class:`_Excluded` with the reason."""
    name = call.name
    first = min(tracked)
    s = tracked[first]
    shape = call.inputs[first][1]
    rank = len(shape)
    out_shapes = [o[1] for o in call.outputs]

    def same(state: _State, k: int = 0) -> dict:
        return {i: state for i in range(len(call.outputs))} if k == 0 else {k: state}

    def only_width_one(what: str) -> None:
        if s.width != 1:
            raise _Excluded(f"{what} reads channels flattened with a spatial map")

    owner = modules.get(call.module) if call.module is not None else None

    # ---- layers
    if name == "linear" or name == "conv1d" or name == "conv2d" or name == "conv3d":
        weight = call.arg(1, "weight")
        pname = call.params.get(weight.index) if isinstance(weight, _T) else None
        if pname is None:
            raise _Excluded(f"{name} with a weight that is not a parameter of the model")
        mod_name = pname.rpartition(".")[0]
        mod = modules.get(mod_name)
        if 0 in tracked and len(tracked) == 1:
            if name == "linear":
                if s.dim != -1:
                    raise _Excluded(f"{mod_name} (a Linear) reads dimension {rank + s.dim} of its {rank}-D input, not the "
                                    "last")
                if isinstance(mod, nn.MultiheadAttention):
                    only_width_one(mod_name)
                    flow.attention_inputs.add(mod_name)
                    return {}
                flow.consumers[mod_name] = s.width
                return {}
            only_width_one(mod_name)
            spatial = int(name[-2])
            if s.dim != -(spatial + 1):
                raise _Excluded(f"{mod_name} reads the channels at dimension {rank + s.dim}, not its channel dimension")
            groups = int(call.arg(6, "groups", 1))
            if isinstance(mod, nn.modules.conv._ConvTransposeNd) or mod is None:
                raise _Excluded(f"{mod_name} is a transposed convolution")
            if groups == 1:
                flow.consumers[mod_name] = 1
                return {}
            if mod.in_channels == groups == mod.out_channels:
                flow.depthwise.add(mod_name)
                return same(s)
            flow.grouped[mod_name] = (mod.in_channels, groups)
            flow.consumers[mod_name] = 1
            return {}
        raise _Excluded(f"{name} with the channels in its weight or bias")
    if name == "batch_norm":
        if set(tracked) != {0}:
            raise _Excluded("batch_norm with the channels in its statistics")
        only_width_one("a BatchNorm")
        if rank + s.dim != 1:
            raise _Excluded(f"a BatchNorm normalises dimension 1, the channels are at {rank + s.dim}")
        if owner is None or not isinstance(owner, nn.modules.batchnorm._BatchNorm):
            raise _Excluded("a batch_norm call outside a BatchNorm module")
        flow.bns.add(call.module)
        return same(s)
    if name in ("layer_norm", "rms_norm"):
        if set(tracked) != {0}:
            raise _Excluded(f"{name} with the channels in its weight or bias")
        only_width_one("a LayerNorm")
        normalized = call.arg(1, "normalized_shape")
        if s.dim != -1 or len(tuple(normalized)) != 1:
            raise _Excluded(f"{name} over {tuple(normalized)} while the channels are at dimension {rank + s.dim} of {shape}")
        if owner is None or not isinstance(owner, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            raise _Excluded(f"a {name} call outside a LayerNorm module")
        flow.norms.setdefault(call.module, None)
        return same(s)
    if name.startswith("module:"):
        mod = modules[call.module]
        if isinstance(mod, nn.MultiheadAttention):
            if s.dim != -1:
                raise _Excluded(f"{call.module} (nn.MultiheadAttention) reads the channels at dimension {rank + s.dim}")
            only_width_one(call.module)
            flow.attention_inputs.add(call.module)
            return {}
        if set(tracked) != {0}:
            raise _Excluded(f"{call.module} receives the channels in an unexpected argument")
        only_width_one(call.module)
        if s.dim != -1:
            raise _Excluded(f"{call.module} ({type(mod).__name__}) normalises the last dimension; the channels are at "
                            f"dimension {rank + s.dim} of {shape}")
        flow.norms.setdefault(call.module, -1)
        return same(s)
    if name in ("group_norm", "instance_norm", "local_response_norm", "normalize"):
        raise _Excluded(f"{name} mixes channels")
    if name == "embedding":
        raise _Excluded("embedding with the channels in its indices")
    if name in ("scaled_dot_product_attention", "multi_head_attention_forward"):
        raise _Excluded(f"{name} over the channels")

    # ---- element-wise
    if name in _POINTWISE:
        if name in ("pow", "pow_", "__pow__") and isinstance(call.arg(1, "exponent"), _T):
            raise _Excluded("pow with a tensor exponent")
        if set(tracked) != {0}:
            raise _Excluded(f"{name} with the channels in a secondary argument")
        return same(s)
    if name in _BINARY:
        states = set(tracked.values())
        if len(states) != 1:
            raise _Excluded(f"{name} of tensors carrying the channels at different dimensions or widths")
        out_rank = len(out_shapes[0])
        pos_out = out_rank + s.dim
        channel_size = out_shapes[0][pos_out]
        for i, (_, shp) in enumerate(call.inputs):
            if i in tracked:
                continue
            r = len(shp)
            if r + s.dim >= 0 and shp[r + s.dim] != 1 and channel_size != 1:
                raise _Excluded(f"{name} with a tensor of shape {shp} that has the channels' size but is not part of "
                                "the group (a buffer or a computed tensor)")
        return same(s)

    # ---- reductions and pooling
    if name in _REDUCE:
        dims = _dims_arg(call.arg(2, "dim") if name == "norm" else call.arg(1, "dim"), rank)
        if dims is None:
            raise _Excluded(f"{name} over every dimension, channels included")
        if s.dim in dims:
            raise _Excluded(f"{name} over the channels (dimension {rank + s.dim})")
        only_width_one(name)
        keep = bool(call.kwargs.get("keepdim", False) if name in ("std", "var", "norm") else call.arg(2, "keepdim", False))
        return same(_State(s.dim if keep else s.dim + sum(1 for d in dims if d > s.dim)))
    if name in _POOL:
        only_width_one(name)
        if s.dim >= -_POOL[name]:
            raise _Excluded(f"{name} pools the dimension that holds the channels")
        return same(s)
    if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle"):
        only_width_one(name)
        if name == "pixel_shuffle" or s.dim >= -(rank - 2):
            raise _Excluded(f"{name} over the channels")
        return same(s)
    if name == "pad":
        pad = call.arg(1, "pad")
        if s.dim >= -(len(pad) // 2) and any(pad[2 * (-s.dim - 1): 2 * (-s.dim - 1) + 2]):
            raise _Excluded("pad of the channel dimension")
        return same(s)
    if name == "roll":
        dims = _dims_arg(call.arg(2, "dims"), rank)
        if dims is None or s.dim in dims:
            raise _Excluded("roll over the channels")
        return same(s)
    if name in ("softmax", "log_softmax", "softmin", "cumsum", "cumprod", "argmax", "argmin", "sort", "topk"):
        dim = call.arg(1, "dim")
        if dim is None or _norm_dim(int(dim), rank) == s.dim:
            raise _Excluded(f"{name} over the channels")
        return same(s)

    # ---- shapes
    if name in _RESHAPE:
        if set(tracked) != {0}:
            raise _Excluded(f"{name} with the channels in its shape argument")
        return same(_reshape(s, shape, out_shapes[0]))
    if name in ("permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT",
                "numpy_T"):
        pos = rank + s.dim
        if name == "permute":
            order = call.args[1:] if len(call.args) > 2 else call.arg(1, "dims")
            order = [int(d) % rank for d in order]
        else:
            order = list(range(rank))
            if name in ("t", "T", "numpy_T") or (name == "mT"):
                a, b = (rank - 2, rank - 1) if name == "mT" or rank >= 2 else (0, 0)
                if name in ("T", "numpy_T"):
                    order = order[::-1]
                else:
                    order[a], order[b] = order[b], order[a]
            elif name in ("movedim", "moveaxis"):
                src = _dims_arg(call.arg(1, "source"), rank)
                dst = _dims_arg(call.arg(2, "destination"), rank)
                rest = [d for d in range(rank) if d - rank not in src]
                order = [None] * rank
                for a, b in zip(src, dst):
                    order[rank + b] = rank + a
                it = iter(rest)
                order = [o if o is not None else next(it) for o in order]
            else:
                a = int(call.arg(1, "dim0")) % rank
                b = int(call.arg(2, "dim1")) % rank
                order[a], order[b] = order[b], order[a]
        return same(_State(order.index(pos) - rank, s.width))
    if name in ("expand", "expand_as", "broadcast_to", "repeat", "tile"):
        if set(tracked) != {0}:
            raise _Excluded(f"{name} with the channels in its shape argument")
        out = out_shapes[0]
        if out[len(out) + s.dim] != shape[rank + s.dim]:
            raise _Excluded(f"{name} repeats the channel dimension")
        return same(s)
    if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
        tensors = call.arg(0, "tensors")
        dim = int(call.arg(1, "dim", 0))
        states = set(tracked.values())
        if len(states) != 1:
            raise _Excluded(f"{name} of tensors carrying the channels at different dimensions")
        if name in ("hstack", "vstack"):
            raise _Excluded(f"{name} of tensors carrying the channels")
        if name == "stack":
            pos_new = dim % (rank + 1)
            pos = rank + s.dim
            return same(_State((pos + (1 if pos_new <= pos else 0)) - (rank + 1), s.width))
        if _norm_dim(dim, rank) == s.dim:
            if s.width != 1:
                raise _Excluded(f"{name} of flattened maps")
            return same(s)
        for ref in tensors:
            if ref.index not in tracked:
                shp = call.inputs[ref.index][1]
                if shp[len(shp) + s.dim] != 1:
                    raise _Excluded(f"{name} with a tensor of shape {shp} that has the channels but is not part of the "
                                    "group")
        return same(s)
    if name in _SPLIT:
        dim = call.arg(2, "dim", 0) if name != "unbind" else call.arg(1, "dim", 0)
        d = _norm_dim(int(dim), rank)
        if d == s.dim:
            raise _Excluded(f"{name} of the channels (their sizes are written in the code)")
        if name == "unbind":
            return same(_State(s.dim + (1 if d > s.dim else 0), s.width))
        return same(s)
    if name in _SELECT:
        d = _norm_dim(int(call.arg(1, "dim")), rank)
        if d == s.dim:
            raise _Excluded(f"{name} of channels")
        if name == "select":
            return same(_State(s.dim + (1 if d > s.dim else 0), s.width))
        return same(s)
    if name == "__getitem__":
        return same(_getitem(s, shape, call.args[1], out_shapes[0]))
    if name in ("matmul", "__matmul__", "bmm", "mm"):
        a, b = call.args[0], call.args[1]
        if len(tracked) == 1 and rank >= 2:
            # a @ b contracts a's last and b's second-to-last dimension; the others pass
            contracted = -1 if first == getattr(a, "index", None) else -2
            if s.dim != contracted and s.width == 1:
                return same(s)
        raise _Excluded(f"{name} over the channels")
    raise _Excluded(f"{name}, which is not mapped")


def _getitem(s: _State, shape: tuple, index, shape_out: tuple) -> _State:
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (_T, list, torch.Tensor)) for i in index):
        raise _Excluded("indexing with a tensor")
    rank = len(shape)
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (rank - explicit)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (rank - sum(1 for i in expanded if i is not None))
    pos = rank + s.dim
    dim, out_dim = 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if dim == pos:
            if not (isinstance(i, slice) and i == slice(None)) and not (
                    isinstance(i, slice) and range(shape[pos])[i] == range(shape[pos])):
                raise _Excluded("indexing that selects channels")
            return _State(out_dim - len(shape_out), s.width)
        if isinstance(i, slice):
            out_dim += 1
        dim += 1
    raise _Excluded("indexing of the channels")


def follow(trace: Trace, model_modules: dict, sources: dict) -> Flow:
    """Follows the channels from ``sources`` (tensor key -> (dim, width)) through every later call.

    Raises:
        ValueError: with the reason when a call on the way is not channel-wise.
    """
    states: dict = {k: _State(d, w) for k, (d, w) in sources.items()}
    flow = Flow()
    for call in trace.calls:
        tracked = {}
        for i, (k, shp) in enumerate(call.inputs):
            if k in states:
                tracked[i] = states[k]
        if not tracked:
            continue
        try:
            produced = _rule(call, tracked, flow, model_modules)
        except _Excluded as exc:
            where = f" in {call.module}" if call.module else ""
            raise ValueError(f"passes {exc}{where}") from None
        for i, st in produced.items():
            k = call.outputs[i][0]
            old = states.get(k)
            if old is not None and old != st:
                raise ValueError(f"{call.name}: its output carries the channels at two dimensions")
            states[k] = st
    flow.outputs = any(k in states for k in trace.outputs)
    for name, axis in list(flow.norms.items()):
        if axis is None:  # the channel dimension of the norm module's own input (channels-first LayerNorm2d: -3)
            keys = trace.module_inputs.get(name) or [None]
            flow.norms[name] = states[keys[0]].dim if keys[0] in states else -1
    return flow
