"""Multi-head attention with one Linear layer per projection, so that heads can be removed.

``nn.MultiheadAttention`` packs the q, k and v projections into one ``in_proj_weight``
(3E, E) and fixes ``head_dim = E / num_heads``: it cannot hold fewer heads than its
embedding width allows. ``HeadAttention`` computes the same function,

    out = out_proj(concat_h softmax(q_h k_h^T / sqrt(d) + mask) v_h),
    q_h = (x W_q^T + b_q)[..., h d:(h+1) d]   (and k_h, v_h alike),

with separate ``q_proj``, ``k_proj``, ``v_proj`` (H d, E) and ``out_proj`` (E, H d) layers
and ``torch.nn.functional.scaled_dot_product_attention``. Head h is rows h d..(h+1) d - 1 of
q, k and v and the same columns of ``out_proj``; the softmax is per head, so removing a
head whose ``out_proj`` columns are zero changes nothing else (``models.surgery``), and
``num_heads`` goes down while ``head_dim`` stays.

``SelfAttention`` is the same for the other common layout, one ``qkv`` Linear layer (3 H d, E)
and a ``proj`` Linear layer read by a module with ``num_heads`` (timm's ``Attention``, in its
vision transformers, DeiT and others): ``forward(x)`` attends x to itself.

``separate_attention`` replaces every convertible attention of a network in place:
``nn.MultiheadAttention`` (torchvision's ``VisionTransformer`` among them) always, and a
module of the qkv/proj layout when ``SelfAttention`` computes the same function on a random
input (checked, so a module with extras, such as a normalisation of q and k or rotary
embeddings, is left as it is, and the layer analysis names it). ``models.checkpoints`` does
it when a network is loaded, so compressed and uncompressed networks are the same modules.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HeadAttention(nn.Module):
    """``nn.MultiheadAttention``'s interface and function with separate projections.

    ``embed_dim`` E (the width of queries and outputs), ``num_heads`` H, ``head_dim`` d
    (H d may differ from E once heads are removed), ``kdim``/``vdim`` (widths of keys and
    values, default E), ``dropout`` on the attention weights in training, ``batch_first``
    ((B, T, E) inputs instead of (T, B, E)). ``forward(query, key, value, ...)`` returns
    ``(output, weights)``: ``weights`` (B, T, S), averaged over heads unless
    ``average_attn_weights=False``, only when ``need_weights``; else None."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: Optional[int] = None, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, dropout: float = 0.0,
                 batch_first: bool = False, out_dim: Optional[int] = None, out_bias: Optional[bool] = None) -> None:
        super().__init__()
        head_dim = head_dim or embed_dim // num_heads
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"HeadAttention needs at least one head of at least one feature (got num_heads="
                             f"{num_heads}, head_dim={head_dim})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, out_dim or embed_dim, bias=bias if out_bias is None else out_bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "HeadAttention":
        """The same function as ``mha`` (its weights copied); ``ValueError`` for the options that
        have no counterpart here (``add_bias_kv``, ``add_zero_attn``)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be separated into heads")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias=bias, kdim=mha.kdim, vdim=mha.vdim,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(E)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(E) if bias else (None, None, None)
        with torch.no_grad():
            for layer, weight, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                layer.weight.copy_(weight)
                if b is not None:
                    layer.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.to(mha.out_proj.weight)
        return new.train(mha.training)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, H d) -> (B, H, T, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, self.num_heads)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if is_causal and mask is None:
                mask = torch.full(scores.shape[-2:], float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            mixed = F.dropout(weights, p) @ v
        else:
            weights = None
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                   is_causal=is_causal and mask is None)
        out = self.out_proj(mixed.transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


class SelfAttention(HeadAttention):
    """The qkv/proj layout of attention (timm's ``Attention``) as a ``HeadAttention``:
    ``forward(x, attn_mask=None, is_causal=False)`` returns ``proj_drop(out_proj(attention of
    x to itself))`` for x of shape (B, T, E), ``attn_mask`` in
    ``scaled_dot_product_attention``'s convention (boolean: True = may attend)."""

    def __init__(self, *args: object, proj_drop: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **{**kwargs, "batch_first": True})
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_qkv(cls, module: nn.Module) -> Optional["SelfAttention"]:
        """The same function as ``module`` (its weights copied), or None when ``module`` is not of
        the qkv/proj layout (``qkv`` and ``proj`` Linear layers, ``qkv`` making 3 H d features,
        ``num_heads`` H) or computes something else on a random input (extras this class lacks)."""
        qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
            return None
        inner = proj.in_features
        if qkv.out_features != 3 * inner or inner % heads:
            return None
        drop = getattr(module, "attn_drop", None)
        out_drop = getattr(module, "proj_drop", None)
        new = cls(qkv.in_features, heads, inner // heads, bias=qkv.bias is not None, out_dim=proj.out_features,
                  out_bias=proj.bias is not None, dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0,
                  proj_drop=out_drop.p if isinstance(out_drop, nn.Dropout) else 0.0).to(proj.weight)
        with torch.no_grad():
            for layer, weight in zip((new.q_proj, new.k_proj, new.v_proj), qkv.weight.split(inner)):
                layer.weight.copy_(weight)
            if qkv.bias is not None:
                for layer, b in zip((new.q_proj, new.k_proj, new.v_proj), qkv.bias.split(inner)):
                    layer.bias.copy_(b)
            new.out_proj.weight.copy_(proj.weight)
            if proj.bias is not None:
                new.out_proj.bias.copy_(proj.bias)
        if not _same_function(module, new, qkv.in_features, proj.weight):
            return None
        return new.train(module.training)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:  # type: ignore[override]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # HeadAttention's convention is nn.MultiheadAttention's: True = blocked
        out, _ = super().forward(x, x, x, need_weights=False, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(out)


@torch.no_grad()
def _same_function(module: nn.Module, candidate: SelfAttention, width: int, like: Tensor) -> bool:
    """Whether ``module(x)`` equals ``candidate(x)`` for a random (2, 7, width) x, in eval mode."""
    was_training = module.training
    module.eval()
    try:
        x = torch.randn(2, 7, width, generator=torch.Generator().manual_seed(0)).to(like)
        expected = module(x)
        if not isinstance(expected, Tensor) or expected.shape != (2, 7, candidate.out_proj.out_features):
            return False
        got = candidate.eval()(x)
    except Exception:  # a forward with other arguments or outputs is not this layout
        return False
    finally:
        module.train(was_training)
    scale = float(expected.abs().max()) or 1.0
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale))


def _additive_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], dtype: torch.dtype,
                   num_heads: int) -> Optional[Tensor]:
    """``nn.MultiheadAttention``'s masks (boolean: True = not attended; or float: added) as one
    float mask added to the scores, broadcastable to (B, H, T, S)."""
    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.ndim == 3:  # (B H, T, S), batch-major
            mask = mask.view(-1, num_heads, *mask.shape[1:])
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def separate_attention(model: nn.Module, only: Optional[set[str]] = None) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` by the equal ``HeadAttention``, and
    every module of the qkv/proj layout by the equal ``SelfAttention`` (those at the paths in
    ``only``, when given), in place; returns the paths replaced. Modules with options these
    classes lack are left as they are (the layer analysis then names them as unknown)."""
    from models.surgery import replace_module

    done: list[str] = []
    for name, module in list(model.named_modules()):
        if (only is not None and name not in only) or isinstance(module, HeadAttention) or \
                any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(module, nn.MultiheadAttention):
            try:
                new: Optional[nn.Module] = HeadAttention.from_multihead(module)
            except ValueError:
                continue
        else:
            new = SelfAttention.from_qkv(module)
        if new is not None:
            replace_module(model, name, new)
            done.append(name)
    return done
