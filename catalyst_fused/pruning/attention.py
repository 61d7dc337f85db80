"""Attention heads as targets, and the head counts that follow a removal.

A head is ``head_dim`` consecutive rows of the query, key and value projections and as many input columns of
the output projection. With grouped-query attention (``n_rep = heads / kv_heads`` query heads share one
key/value head) the unit that can go is a key/value head with its ``n_rep`` query heads: one target channel
is then ``n_rep * head_dim`` rows of the query projection and of the output projection's columns, and
``head_dim`` rows of the key and value projections. Removing heads physically leaves every other head's
computation unchanged (softmax and scaling are per head), so the pruned model equals the model with the
removed heads' output-projection columns zeroed.

Recognised modules (:func:`find_attention`):

* ``nn.MultiheadAttention`` with packed projections (``in_proj_weight``; no ``bias_k``/``bias_v``, no
  ``add_zero_attn``). Its query/key/value width is tied to its embedding width in PyTorch's implementation,
  so a pruned one becomes a :class:`PrunedMultiheadAttention` (same parameters and arguments, widths apart).
* Separate ``q_proj``/``k_proj``/``v_proj`` and ``o_proj`` (or ``out_proj``) ``nn.Linear`` children with a
  ``head_dim`` (Hugging Face Llama, Mistral, Qwen2/3, Gemma, ...), key/value heads from the projection sizes.
* ``query``/``key``/``value`` children with ``attention_head_size`` and the output projection at
  ``<parent>.output.dense`` (Hugging Face BERT, RoBERTa, ViT, ...).
* A fused ``qkv`` ``nn.Linear`` and ``proj`` with ``num_heads`` and ``head_dim`` (timm ``Attention``).

The forward code must derive head counts from tensor shapes (``view(..., -1, head_dim)``) or from the
attributes this module updates (``num_heads``, ``num_attention_heads``, ``num_key_value_heads``,
``all_head_size``, ``attn_dim``); the tests check pruned == masked for each family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionSite", "find_attention", "sync_heads_", "sync_multihead_attention_", "PrunedMultiheadAttention"]

_Q_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTHS = ("all_head_size", "attn_dim", "inner_dim")


@dataclass
class AttentionSite:
    """An attention module whose heads form one target. ``qkv``: ``(module, first row, rows, rows per channel)``
    of the query, key and value projections; ``out``: the output projection (its input columns)."""

    module: str
    kind: str
    heads: int
    kv_heads: int
    head_dim: int
    qkv: list
    out: str

    @property
    def projections(self) -> list[str]:
        return list(dict.fromkeys(m for m, *_ in self.qkv))


def _linear(mod) -> bool:
    return isinstance(mod, nn.Linear)


def _int_attr(mod, names) -> Optional[int]:
    for n in names:
        v = getattr(mod, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _site(name: str, mod: nn.Module, modules: dict) -> tuple[Optional[AttentionSite], Optional[str]]:
    """``(site, None)``, ``(None, reason)`` for a recognised module that cannot be pruned by heads, or
    ``(None, None)`` when ``mod`` is not an attention module."""
    prefix = name + "." if name else ""
    if isinstance(mod, nn.MultiheadAttention):
        if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
            return None, "separate query/key/value weights (kdim/vdim) are not mapped"
        if mod.bias_k is not None or mod.add_zero_attn:
            return None, "bias_k/bias_v or add_zero_attn are not mapped"
        rows = mod.in_proj_weight.shape[0] // 3
        hd = mod.head_dim
        return AttentionSite(name, "multihead", rows // hd, rows // hd, hd,
                             [(name, 0, rows, hd), (name, rows, rows, hd), (name, 2 * rows, rows, hd)],
                             prefix + "out_proj"), None
    children = dict(mod.named_children())
    q, k, v = (children.get(n) for n in ("q_proj", "k_proj", "v_proj"))
    o_name = next((n for n in ("o_proj", "out_proj") if _linear(children.get(n))), None)
    if all(_linear(m) for m in (q, k, v)) and o_name is not None:
        hd = _int_attr(mod, ("head_dim", "attention_head_size"))
        if hd is None:
            heads = _int_attr(mod, _Q_HEADS)
            hd = q.out_features // heads if heads else None
        if hd is None or q.out_features % hd or k.out_features % hd or k.out_features != v.out_features:
            return None, "query/key/value sizes are not a whole number of heads"
        return _checked(AttentionSite(name, "separate", q.out_features // hd, k.out_features // hd, hd,
                                      [(prefix + "q_proj", 0, q.out_features, None), (prefix + "k_proj", 0, k.out_features, hd),
                                       (prefix + "v_proj", 0, v.out_features, hd)], prefix + o_name), mod, (q, k, v, children[o_name]))
    q, k, v = (children.get(n) for n in ("query", "key", "value"))
    if all(_linear(m) for m in (q, k, v)) and _int_attr(mod, ("attention_head_size",)):
        hd = mod.attention_head_size
        parent_name = name.rpartition(".")[0]
        out = getattr(getattr(modules.get(parent_name), "output", None), "dense", None)
        if not _linear(out) or out.in_features != q.out_features:
            return None, "no output projection at <parent>.output.dense"
        if q.out_features % hd or k.out_features != q.out_features or v.out_features != q.out_features:
            return None, "query/key/value sizes are not a whole number of heads"
        h = q.out_features // hd
        return _checked(AttentionSite(name, "separate", h, h, hd, [(prefix + "query", 0, q.out_features, hd),
                                                                 (prefix + "key", 0, k.out_features, hd),
                                                                 (prefix + "value", 0, v.out_features, hd)],
                                      (parent_name + ".output.dense") if parent_name else "output.dense"),
                        mod, (q, k, v))
    qkv, proj = children.get("qkv"), children.get("proj")
    if _linear(qkv) and _linear(proj) and _int_attr(mod, ("num_heads",)) and _int_attr(mod, ("head_dim",)):
        hd, h = mod.head_dim, mod.num_heads
        if qkv.out_features != 3 * h * hd or proj.in_features != h * hd:
            return None, "qkv is not query, key and value of num_heads * head_dim rows each"
        if getattr(mod, "gate", None) is not None:
            return None, "a gated attention output is not mapped"
        if not isinstance(getattr(mod, "norm", nn.Identity()), nn.Identity):
            return None, "a norm over the heads' output is not mapped"
        if any(p.dim() and h in p.shape for n, p in mod.named_parameters() if not n.startswith(("qkv.", "proj.", "q_norm.", "k_norm."))):
            return None, "a parameter per head is not mapped"
        return AttentionSite(name, "fused", h, h, hd, [(prefix + "qkv", 0, h * hd, hd), (prefix + "qkv", h * hd, h * hd, hd),
                                                       (prefix + "qkv", 2 * h * hd, h * hd, hd)], prefix + "proj"), None
    return None, None


def _checked(site: AttentionSite, mod: nn.Module, projections) -> tuple[Optional[AttentionSite], Optional[str]]:
    """The site with the query rows per channel set (GQA), or the reason it cannot be pruned by heads."""
    if site.heads % site.kv_heads:
        return None, f"{site.heads} query heads do not split into {site.kv_heads} key/value groups"
    proj = {id(p) for p in projections}
    for child_name, child in mod.named_children():
        # other children may hold norms over one head's features (Qwen3's q_norm/k_norm), shared by every head
        if id(child) not in proj and any(p.shape != (site.head_dim,) for p in child.parameters()):
            return None, f"{child_name} has parameters that are not mapped"
    if any(True for _ in mod.parameters(recurse=False)):
        return None, "a parameter of the attention module itself is not mapped"
    n_rep = site.heads // site.kv_heads
    site.qkv[0] = (site.qkv[0][0], site.qkv[0][1], site.qkv[0][2], n_rep * site.head_dim)
    return site, None


def find_attention(model: nn.Module) -> tuple[list[AttentionSite], list[dict]]:
    """Every recognised attention module of ``model`` (outermost first) and the recognised ones that cannot be
    pruned by heads (``{"producers": [...], "reason": ...}``)."""
    modules = dict(model.named_modules())
    sites, excluded, inside = [], [], set()
    for name, mod in modules.items():
        if any(name.startswith(s + ".") for s in inside):
            continue
        site, reason = _site(name, mod, modules)
        if site is not None:
            sites.append(site)
            inside.add(name)
        elif reason is not None:
            excluded.append({"producers": [name], "reason": f"attention heads of {name}: {reason}"})
    return sites, excluded


def sync_heads_(model: nn.Module, site_module: str, head_dim: int) -> None:
    """After a removal: sets the head-count attributes of ``site_module`` from its projections' sizes."""
    mod = model.get_submodule(site_module)
    if isinstance(mod, nn.MultiheadAttention):
        sync_multihead_attention_(mod)
        return
    children = dict(mod.named_children())
    if "qkv" in children:
        heads = kv_heads = children["qkv"].out_features // 3 // head_dim
    else:
        q = children.get("q_proj") or children.get("query")
        k = children.get("k_proj") or children.get("key")
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    for names, value in ((_Q_HEADS, heads), (_KV_HEADS, kv_heads), (_WIDTHS, heads * head_dim)):
        for n in names:
            if isinstance(getattr(mod, n, None), int) and not isinstance(getattr(mod, n), bool):
                setattr(mod, n, value)


def sync_multihead_attention_(mod: nn.MultiheadAttention) -> None:
    """After a removal: the embedding width from ``in_proj_weight``'s columns, the head count from its rows;
    the module becomes a :class:`PrunedMultiheadAttention` (PyTorch's ties the two widths)."""
    qkv = mod.in_proj_weight.shape[0] // 3
    mod.embed_dim = mod.kdim = mod.vdim = int(mod.in_proj_weight.shape[1])
    mod.num_heads = qkv // mod.head_dim
    if type(mod) is nn.MultiheadAttention:
        mod.__class__ = PrunedMultiheadAttention
    elif not isinstance(mod, PrunedMultiheadAttention) and qkv != mod.embed_dim:
        raise TypeError(f"a pruned {type(mod).__name__} (a subclass of nn.MultiheadAttention) cannot take a query/key/value "
                        "width different from its embedding width")


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after heads or embedding channels were removed: the query/key/value width is
    ``num_heads * head_dim`` whatever ``embed_dim`` is. Same parameters, arguments and results (self- or
    cross-attention with packed projections; boolean masks mark positions to ignore, float masks are added)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, N, E) from here on
        h, hd = self.num_heads, self.head_dim
        d = h * hd
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:d], None if b is None else b[:d])
        k = F.linear(key, w[d:2 * d], None if b is None else b[d:2 * d])
        v = F.linear(value, w[2 * d:], None if b is None else b[2 * d:])
        L, N, S = q.shape[0], q.shape[1], k.shape[0]
        q, k, v = (t.reshape(t.shape[0], N, h, hd).permute(1, 2, 0, 3) for t in (q, k, v))  # (N, h, len, hd)
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.view(N, h, L, S) if mask.dim() == 3 else mask
        elif is_causal:
            mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).view(N, 1, 1, S)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * hd ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), p=p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, d)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
