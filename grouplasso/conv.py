"""Patches of a convolution: the one place where a Conv2d becomes a multi-task lasso.

A Conv2d y = conv(x; V) + b is, at every output position, a Linear layer on the patch p of
the input under the kernel: C_in*kh*kw values, channel-major as ``F.unfold`` orders them, so
that ``V = conv.weight.reshape(D, -1)`` gives ``y - b = V p`` exactly. Its statistics are the
Linear ones with one sample per (image, output position):

    G = mean p p^T,   C = mean (y - b) p^T,   s = mean ||y - b||^2    (y - b: the D channels)

and group size g = kh*kw (input channel c is columns c*g .. (c+1)*g - 1). See DESIGN.md,
"Groups of columns (convolutions)".

- ``conv_patches(conv, x)`` (B*P, K) and ``conv_outputs(y)`` (B*P, D), rows in the same
  (image, position) order, optionally only the positions ``index`` (B, m) of each image;
- ``PositionSampler``: m positions per image, drawn without replacement, seeded once;
- ``conv_chunks``: a batch as (patches, outputs) chunks of whole images, each below a memory
  budget, to feed ``StatsAccumulator.update`` one after the other (exact: sums are additive);
- ``ConvStatsAccumulator``: the statistics of a Conv2d from batches of its inputs and outputs,
  by the patches above or, when the input is small (AlexNet's 3x3 maps), by the cheaper
  exact *pixel* route: the Gram matrix of whole input images, (C_in*H*W)^2 over images
  instead of (C_in*kh*kw)^2 over images and positions, summed into G once at the end.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grouplasso.stats import LassoStats, StatsAccumulator

# Bytes one chunk's float64 patches and outputs (and the unfolded input) may take.
CHUNK_BYTES = 64 * 2**20


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The zero padding (left, right, top, bottom) of ``conv``'s input, after checking that
    the layer is one this module handles (a ValueError otherwise)."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"grouped convolutions (groups={conv.groups}) are not supported: their weight is not one "
                         "matrix over all input channels")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":  # as torch pads it: total d*(k-1), the odd one on the right/bottom
            (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return tw // 2, tw - tw // 2, th // 2, th - th // 2
        raise ValueError(f"padding={padding!r} is not supported (only 'valid', 'same' or integers)")
    ph, pw = padding
    return pw, pw, ph, ph


def _unfold(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``F.unfold`` of ``x`` (B, C_in, H, W) under ``conv``'s kernel: (B, K, P)."""
    left, right, top, bottom = conv_padding(conv)
    if x.ndim != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"expected inputs (B, {conv.in_channels}, H, W), got {tuple(x.shape)}")
    if left == right and top == bottom:
        padding = (top, left)
    else:
        x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


def _rows(cols: Tensor, index: Optional[Tensor], dtype: Optional[torch.dtype]) -> Tensor:
    """(B, F, P) -> (B*P, F) (or (B*m, F) at positions ``index`` (B, m)), in one copy."""
    if index is not None:
        cols = cols.gather(2, index.to(cols.device)[:, None, :].expand(-1, cols.shape[1], -1))
    B, F_, P = cols.shape
    out = torch.empty((B, P, F_), dtype=dtype or cols.dtype, device=cols.device)
    out.copy_(cols.transpose(1, 2))
    return out.reshape(B * P, F_)


def conv_patches(conv: nn.Conv2d, x: Tensor, index: Optional[Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """The patches of ``x`` (B, C_in, H, W) under ``conv``: (B*P, C_in*kh*kw), row b*P + q the
    patch of image b at output position q (row-major over the output's H' x W'), columns
    channel-major (matching ``conv.weight.reshape(D, -1)``). ``index`` (B, m): only those
    positions of each image, rows b*m + j. ``dtype``: of the result (default ``x``'s)."""
    return _rows(_unfold(conv, x), index, dtype)


def conv_outputs(y: Tensor, index: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The outputs ``y`` (B, D, H', W') as (B*P, D) rows, in ``conv_patches``' order."""
    if y.ndim != 4:
        raise ValueError(f"expected outputs (B, D, H', W'), got {tuple(y.shape)}")
    return _rows(y.flatten(2), index, dtype)


class PositionSampler:
    """``positions`` output positions per image, drawn without replacement for each image by
    one ``torch.Generator`` seeded once with ``seed`` (so a pass is reproducible: the draws
    depend only on the sequence of batch sizes). ``positions=None``: all positions."""

    def __init__(self, positions: Optional[int] = None, seed: int = 0) -> None:
        if positions is not None and positions < 1:
            raise ValueError(f"positions must be a positive number of positions per image, got {positions}")
        self.positions = positions
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: int, total: int) -> Optional[Tensor]:
        """The positions (images, min(positions, total)) (int64, CPU) to keep of each image's
        ``total``; None when all are kept."""
        if self.positions is None or self.positions >= total:
            return None
        keys = torch.rand(images, total, generator=self.generator)
        return keys.argsort(dim=1)[:, :self.positions].sort(dim=1).values


def conv_chunks(conv: nn.Conv2d, x: Tensor, y: Tensor, index: Optional[Tensor] = None,
                budget: int = CHUNK_BYTES) -> Iterator[tuple[Tensor, Tensor]]:
    """(patches, outputs) in float64, (n, K) and (n, D), for ``x`` (B, C_in, H, W) and
    ``conv(x) = y`` (B, D, H', W'), at positions ``index`` (B, m) or all, in chunks of whole
    images whose unfolded input and float64 rows stay below ``budget`` bytes (at least one
    image a chunk). Feeding every chunk to ``StatsAccumulator.update`` accumulates the
    statistics of the whole batch exactly."""
    if x.ndim == 3:  # an unbatched input
        x, y = x[None], y[None]
    B, P = x.shape[0], y.shape[-2] * y.shape[-1]
    K, D = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], y.shape[1]
    m = P if index is None else index.shape[1]
    per_image = max(P * K * x.element_size(), m * (K + D) * 8)
    step = max(1, budget // per_image)
    for start in range(0, B, step):
        rows = slice(start, start + step)
        sub = None if index is None else index[rows]
        yield (conv_patches(conv, x[rows], sub, dtype=torch.float64),
               conv_outputs(y[rows], sub, dtype=torch.float64))


def pixel_table(conv: nn.Conv2d, height: int, width: int) -> Tensor:
    """(P, kh*kw) int64: the input pixel (row-major index into the H x W input) under each
    kernel entry at each output position, ``height * width`` where it falls on the padding."""
    left, right, top, bottom = conv_padding(conv)
    pixels = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
    pixels = F.pad(pixels, (left, right, top, bottom), value=float(height * width))
    table = F.unfold(pixels, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)[0]
    return table.T.round().long()


def pixel_route_pays(conv: nn.Conv2d, height: int, width: int, positions: int) -> bool:
    """Whether the pixel route is cheaper than the patches for ``conv`` on H x W inputs with P
    output positions: image Gram (C*H*W)^2 / 2 against patch Gram P*K^2 / 2 per image, and
    the pixel sums (C*H*W)^2 at most four times G's size (memory)."""
    (kh, kw), hw = conv.kernel_size, height * width
    return hw * hw < positions * (kh * kw) ** 2 and hw <= 2 * kh * kw


class ConvStatsAccumulator:
    """The float64 sums of ``conv``'s statistics (module doc), fed whole batches of the
    layer's inputs x (B, C_in, H, W) and outputs y (B, D, H', W') by ``update``; the same
    ``all_reduce`` and ``finalize`` as ``StatsAccumulator`` (``finalize().n`` counts patches:
    images times positions). ``positions``, ``seed``: sample positions (``PositionSampler``).

    ``route``: ``"patches"`` (unfold, in chunks below ``budget`` bytes), ``"pixels"`` (only
    without sampling) or ``"auto"`` (``pixel_route_pays``). Both are exact. The pixel route
    accumulates, over images, M = x x^T and N = (y - b) x^T of the flattened input x
    (C_in*H*W) and outputs y (D*P): a patch entry (c, u) at position q is the pixel
    x[c, pix(q, u)] (or 0 on the padding), so

        sum p p^T [(c,u), (c',v)] = sum_q M[(c, pix(q,u)), (c', pix(q,v))],
        sum (y - b) p^T [d, (c,u)] = sum_q N[(d, q), (c, pix(q,u))],

    contracted into the patch sums once, at ``all_reduce`` or ``finalize`` (so every rank
    reduces sums of the same shapes whichever route it took)."""

    def __init__(self, conv: nn.Conv2d, device: torch.device | str = "cpu", positions: Optional[int] = None,
                 seed: int = 0, route: str = "auto", budget: int = CHUNK_BYTES) -> None:
        conv_padding(conv)  # refuses what this module cannot unfold
        if route not in ("auto", "patches", "pixels"):
            raise ValueError(f"route must be 'auto', 'patches' or 'pixels', got {route!r}")
        if route == "pixels" and positions is not None:
            raise ValueError("the pixel route uses every position: it cannot sample positions")
        kh, kw = conv.kernel_size
        bias = conv.bias.detach() if conv.bias is not None else None
        self.conv, self.route, self.budget = conv, route, budget
        self.stats = StatsAccumulator(conv.in_channels * kh * kw, conv.out_channels, bias=bias, device=device,
                                      group=kh * kw)
        self.sampler = PositionSampler(positions, seed)
        self._pixels: Optional[StatsAccumulator] = None  # the pixel route's sums M, N for inputs of
        self._shape: Optional[tuple[int, int, int, int]] = None  # (H, W, H', W')

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch: inputs ``x`` (B, C_in, H, W) and outputs ``y = conv(x)`` (B, D, H', W')."""
        if x.ndim == 3:  # an unbatched input
            x, y = x[None], y[None]
        (H, W), (Ho, Wo) = x.shape[-2:], y.shape[-2:]
        index = self.sampler(x.shape[0], Ho * Wo)
        if index is None and (self.route == "pixels"
                              or self.route == "auto" and pixel_route_pays(self.conv, H, W, Ho * Wo)):
            self._update_pixels(x, y, (H, W, Ho, Wo))
        else:
            for patches, outputs in conv_chunks(self.conv, x, y, index, self.budget):
                self.stats.update(patches, outputs)

    def _update_pixels(self, x: Tensor, y: Tensor, shape: tuple[int, int, int, int]) -> None:
        if self._shape != shape:  # another input size: close the sums of the previous one
            self._fold()
            P, D = shape[2] * shape[3], self.conv.out_channels
            bias = None if self.stats.bias is None else self.stats.bias.repeat_interleave(P)  # y's rows d*P + q
            self._pixels = StatsAccumulator(x.shape[1] * shape[0] * shape[1], D * P, bias=bias, device=self.stats.G.device)
            self._shape = shape
        self._pixels.update(x.flatten(1), y.flatten(1))

    def _fold(self) -> None:
        """Add the pixel route's sums, contracted, to the patch sums; empty them."""
        if self._pixels is None:
            return
        pixels, (H, W, Ho, Wo) = self._pixels, self._shape
        self._pixels, self._shape = None, None
        images = int(pixels.n.item())
        if images == 0:
            return
        sums = pixels.finalize()  # means over images (the counts below hold the factor ``images``)
        dev, Cin, D, hw, P = sums.G.device, self.conv.in_channels, self.conv.out_channels, H * W, Ho * Wo
        table = pixel_table(self.conv, H, W).to(dev)  # (P, g); H*W: the padding
        g = table.shape[1]
        # on[q, s, u] = images if pixel s is under kernel entry u at position q (none on the padding).
        on = torch.zeros(P, hw + 1, g, dtype=torch.float64, device=dev)
        on.scatter_(1, table[:, None, :], float(images))
        on = on[:, :hw]
        # pairs[s, r, u, v] = sum_q on[q, s, u] on[q, r, v] / images: positions seeing (s, r) under (u, v).
        pairs = torch.einsum("qsu,qrv->sruv", on, on) / images
        M = sums.G.reshape(Cin, hw, Cin, hw).permute(0, 2, 1, 3).reshape(Cin * Cin, hw * hw)
        G = (M @ pairs.reshape(hw * hw, g * g)).reshape(Cin, Cin, g, g).permute(0, 2, 1, 3)
        N = sums.C.reshape(D, P, Cin, hw).permute(0, 2, 1, 3).reshape(D * Cin, P * hw)
        C = N @ on.reshape(P * hw, g)
        # G is symmetric and whole: right for either of StatsAccumulator's layouts of its sum.
        self.stats.G += G.reshape(self.stats.K, self.stats.K)
        self.stats.C += C.reshape(D, self.stats.K)
        self.stats.s += sums.s * images
        self.stats.n += images * P

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """``StatsAccumulator.all_reduce`` of the sums (after this rank's pixel sums are folded in)."""
        self._fold()
        self.stats.all_reduce(reduce_sum)

    def finalize(self) -> LassoStats:
        """The statistics (``LassoStats`` with group kh*kw and n the number of patches)."""
        self._fold()
        return self.stats.finalize()
