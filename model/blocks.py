"""Building blocks of the DDAE UNet: time embedding, residual, attention and resampling blocks, and the
probed-block recorder every network of ours (and a researcher's own) can use.

Module and parameter names follow the original code, so checkpoints load in both directions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the raw conditioning value, then a two-layer MLP.

    Args:
        n_channels: width of the sinusoidal features (the UNet's base width).
        augment_dim: size of the augmentation label vector; 0 disables the label input.
    """

    def __init__(self, n_channels, augment_dim=0):
        super().__init__()
        self.n_channels = n_channels
        if augment_dim > 0:
            self.aug_emb = nn.Linear(augment_dim, n_channels, bias=False)
        self.lin1 = nn.Linear(n_channels, n_channels * 4)
        self.act = nn.SiLU()
        self.lin2 = nn.Linear(n_channels * 4, n_channels * 4)

    def forward(self, t, aug=None):
        half = self.n_channels // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([args.sin(), args.cos()], dim=1).to(self.lin1.weight.dtype)  # (B, n_channels)
        if aug is not None and hasattr(self, "aug_emb"):
            emb = emb + self.aug_emb(aug)
        return self.lin2(self.act(self.lin1(emb)))  # (B, 4 * n_channels)


def resample(x, up, down):
    """Nearest 2x upsampling (``up``), 2x average pooling (``down``), or ``x`` as it is."""
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between.

    With ``up`` or ``down`` it is the BigGAN-style resampling block used by DDPM++: the resampling
    happens after the first norm and activation, and on the shortcut input.
    """

    def __init__(self, in_channels, out_channels, time_channels, dropout=0.1, up=False, down=False):
        super().__init__()
        self.up, self.down = up, down
        self.norm1 = nn.GroupNorm(32, in_channels)
        self.act1 = nn.SiLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(32, out_channels)
        self.act2 = nn.SiLU()
        self.conv2 = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.shortcut = nn.Identity()
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(time_channels, out_channels))

    def forward(self, x, temb):
        h = resample(self.act1(self.norm1(x)), self.up, self.down)
        h = self.conv1(h)
        h = h + self.time_emb(temb)[:, :, None, None]
        h = self.conv2(self.act2(self.norm2(h)))
        return h + self.shortcut(resample(x, self.up, self.down))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, n_channels):
        super().__init__()
        self.norm = nn.GroupNorm(32, n_channels)
        self.projection = nn.Linear(n_channels, n_channels * 3)
        self.output = nn.Linear(n_channels, n_channels)

    def forward(self, x, temb=None):
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.projection(tokens).chunk(3, dim=-1)  # each (B, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        out = self.output(attended).transpose(1, 2).reshape(b, c, h, w)  # a view with channels-last strides
        # Back in the layout of x: else every later activation, and the weight gradients of the 1x1 convs
        # that read them, silently switch layout (DDP warns "Grad strides do not match bucket view strides").
        return out.contiguous(memory_format=memory_format(x)) + x


def memory_format(x):
    """The layout of activation ``x``: ``torch.channels_last`` or ``torch.contiguous_format``."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class UpDownBlock(nn.Module):
    """A residual block optionally followed by attention: one stage of the down or up path."""

    def __init__(self, in_channels, out_channels, time_channels, has_attn, dropout):
        super().__init__()
        self.res = ResidualBlock(in_channels, out_channels, time_channels, dropout)
        self.attn = AttentionBlock(out_channels) if has_attn else nn.Identity()

    def forward(self, x, temb):
        return self.attn(self.res(x, temb))


class Downsample(nn.Module):
    """Halve the resolution: a strided 3x3 conv, or a down residual block (``use_res``)."""

    def __init__(self, n_channels, time_channels, dropout, use_res):
        super().__init__()
        if use_res:
            self.op = ResidualBlock(n_channels, n_channels, time_channels, dropout, down=True)
        else:
            self.conv = nn.Conv2d(n_channels, n_channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x, temb):
        if hasattr(self, "op"):
            return self.op(x, temb)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest x2 then a 3x3 conv, or an up residual block (``use_res``)."""

    def __init__(self, n_channels, time_channels, dropout, use_res):
        super().__init__()
        if use_res:
            self.op = ResidualBlock(n_channels, n_channels, time_channels, dropout, up=True)
        else:
            self.conv = nn.Conv2d(n_channels, n_channels, kernel_size=3, padding=1)

    def forward(self, x, temb):
        if hasattr(self, "op"):
            return self.op(x, temb)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Module):
    """Residual, attention, residual at the lowest resolution."""

    def __init__(self, n_channels, time_channels, dropout):
        super().__init__()
        self.res1 = ResidualBlock(n_channels, n_channels, time_channels, dropout)
        self.attn = AttentionBlock(n_channels)
        self.res2 = ResidualBlock(n_channels, n_channels, time_channels, dropout)

    def forward(self, x, temb):
        return self.res2(self.attn(self.res1(x, temb)), temb)


class BlockRecorder:
    """The probed blocks of one forward pass (docs/DESIGN.md, "Network contract"): call ``keep(h)`` on each
    block's output in ``block_names`` order; it records the wanted ones in ``activations`` and returns True
    once the deepest wanted block is done, so the network stops there.

    Args:
        block_names: the network's blocks, in the order it runs them.
        wanted: a name or list of names (``forward_features``; an unknown one is a ValueError), or None:
            record ``default`` (None: every block) and run to the end (``forward``).
    """

    def __init__(self, block_names, wanted, default=None):
        if wanted is None:
            self.record, self.last = set(block_names if default is None else default), None
        else:
            wanted = [wanted] if isinstance(wanted, str) else list(wanted)
            unknown = [n for n in wanted if n not in block_names]
            if unknown:
                raise ValueError(f"unknown block {unknown[0]!r}; this network has "
                                 f"{block_names[0]}..{block_names[-1]}")
            self.record, self.last = set(wanted), max(block_names.index(n) for n in wanted)
        self.names = enumerate(block_names)
        self.activations = {}

    def keep(self, h):
        index, name = next(self.names)
        if name in self.record:
            self.activations[name] = h
        return index == self.last
