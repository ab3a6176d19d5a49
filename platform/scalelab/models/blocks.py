"""Building blocks: the Res2Net-style multi-scale bottleneck and squeeze-and-excitation."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> bottleneck MLP -> sigmoid gate per channel."""

    def __init__(self, channels: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(4, int(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        gate = self.fc2(torch.relu(self.fc1(gate)))
        return x * torch.sigmoid(gate)


def split_conv(width: int, kernel: int, stride: int, depthwise: bool, dilation: int = 1) -> nn.Module:
    """The kxk convolution of one split: dense, or depthwise kxk + pointwise 1x1.

    A dilated kernel is padded by ``dilation * (k // 2)``: same output size, same weights and
    multiply-adds, a ``dilation * (k - 1) + 1`` wide view.
    """
    pad = dilation * (kernel // 2)
    if not depthwise:
        return nn.Conv2d(width, width, kernel, stride, pad, dilation, bias=False)
    return nn.Sequential(
        nn.Conv2d(width, width, kernel, stride, pad, dilation, groups=width, bias=False),
        nn.Conv2d(width, width, 1, bias=False),
    )


class MultiScaleBottleneck(nn.Module):
    """1x1 reduce -> ``scales`` chained kxk splits (Res2Net) -> 1x1 expand, plus shortcut.

    With ``scales == 1`` there is a single kxk conv over the whole inner width: exactly the plain
    ResNet bottleneck. With ``scales = s`` the inner channels are split into s groups; group i
    (i < s-1) is convolved after adding the previous group's output, so later groups see
    progressively larger receptive fields; the last group passes through (average-pooled when
    the block downsamples, as the chain is cut there). ``dilations`` (cycled across the splits)
    widen each split's view further: (1, 2, 3) lets the third split of a 3x3 chain see 7x7 at once.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        inner: int,
        stride: int = 1,
        scales: int = 1,
        kernel_sizes: tuple[int, ...] = (3,),
        se: bool = False,
        se_ratio: float = 0.25,
        depthwise: bool = False,
        dilations: tuple[int, ...] = (1,),
    ) -> None:
        super().__init__()
        if scales < 1:
            raise ValueError(f"scales must be >= 1, got {scales}")
        if inner % scales:
            raise ValueError(f"inner width {inner} is not divisible by scales={scales}")
        self.scales = scales
        self.width = inner // scales
        self.downsample_block = stride > 1 or in_chs != out_chs
        n_convs = max(1, scales - 1)
        self.conv1 = nn.Conv2d(in_chs, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.convs = nn.ModuleList(
            split_conv(
                self.width,
                kernel_sizes[i % len(kernel_sizes)],
                stride,
                depthwise,
                dilations[i % len(dilations)] if scales > 1 else 1,
            )
            for i in range(n_convs)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(self.width) for _ in range(n_convs))
        self.pool = nn.AvgPool2d(3, stride, 1) if scales > 1 and stride > 1 else None
        self.conv3 = nn.Conv2d(inner, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        nn.init.zeros_(self.bn3.weight)  # each block starts as identity: stabler deep training
        self.se = SqueezeExcite(out_chs, se_ratio) if se else None
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.act = nn.ReLU(inplace=True)

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.Module, str]]:
        """(conv, module holding the BN, its key) for each ``bn(conv(x))`` of :meth:`forward`: what
        :func:`scalelab.models.fold.fold_batchnorm` may fold (a depthwise split's BN follows its
        pointwise conv). The shortcut's pair is an ``nn.Sequential``'s, found there."""
        pairs: list[tuple[nn.Conv2d, nn.Module, str]] = [(self.conv1, self, "bn1")]
        for i, conv in enumerate(self.convs):
            last = conv if isinstance(conv, nn.Conv2d) else conv[-1]
            pairs.append((last, self.bns, str(i)))
        pairs.append((self.conv3, self, "bn3"))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))  # (B, inner, H, W)
        if self.scales == 1:
            out = self.act(self.bns[0](self.convs[0](out)))
        else:
            splits = torch.split(out, self.width, dim=1)  # s x (B, width, H, W)
            outs = []
            prev = None
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
                # chain splits only when spatial sizes agree (not across a stride)
                sp = splits[i] if prev is None or self.downsample_block else splits[i] + prev
                prev = self.act(bn(conv(sp)))
                outs.append(prev)
            last = splits[-1]
            outs.append(self.pool(last) if self.pool is not None else last)
            out = torch.cat(outs, dim=1)
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.act(out + self.shortcut(x))


def _shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    layers: list[nn.Module] = []
    if stride > 1:  # ResNet-D: average-pool then 1x1, so no input pixel is skipped
        layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
    layers += [nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs)]
    return nn.Sequential(*layers)
