"""Noise-conditional WideResNet: the classifier of the score_sde paper (Appendix I.1).

WRN-28-10 is ``WideResNet(blocks_per_group=4, channel_multiplier=10)`` (38,913,114 parameters).
It classifies noised images given a scalar noise level per image: t/1000 for DDPM, ln(sigma) for EDM.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm_relu(channels):
    """GroupNorm with min(C/4, 32) groups followed by ReLU: the network's "activation"."""
    return nn.Sequential(nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-5), nn.ReLU())


def standardize_per_image(x):
    """(x - mean) / max(std, 1/sqrt(C*H*W)) per image, with the unbiased std.

    Args:
        x: images (B, C, H, W) in any range.
    """
    flat = x.flatten(1)  # (B, C*H*W)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=True).clamp(min=1.0 / math.sqrt(flat.shape[1]))
    return (x - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)


class GaussianFourierFeatures(nn.Module):
    """Fixed random features [sin(2 pi t W), cos(2 pi t W)] of a scalar per image.

    W ~ scale * N(0, 1) is saved in the state dict but never trained.
    """

    def __init__(self, n_frequencies=128, scale=16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(n_frequencies) * scale)

    def forward(self, t):
        angles = 2 * math.pi * t[:, None] * self.W[None, :]  # (B, n_frequencies)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, 2 * n_frequencies)


class ConditionalBlock(nn.Module):
    """Pre-activation residual block with a per-channel shift from the noise embedding.

    Args:
        in_channels, out_channels: widths before and after the block.
        stride: stride of the first convolution (and of the shortcut's average pool).
        emb_dim: width of the noise embedding.
        activate_shortcut: feed act(x) instead of x to the shortcut (only the network's first block).
    """

    def __init__(self, in_channels, out_channels, stride, emb_dim, activate_shortcut=False):
        super().__init__()
        self.stride = stride
        self.activate_shortcut = activate_shortcut
        self.init_bn = norm_relu(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.bn_2 = norm_relu(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x, emb):
        activated = self.init_bn(x)  # (B, C_in, H, W)
        shortcut = activated if self.activate_shortcut else x
        h = self.conv1(activated)  # (B, C_out, H/stride, W/stride)
        h = h + self.time_emb(emb)[:, :, None, None]
        h = self.conv2(self.bn_2(h))
        return h + self._match_shortcut(shortcut, h.shape[1])

    def _match_shortcut(self, shortcut, out_channels):
        if shortcut.shape[1] == out_channels:
            return shortcut
        # Widths differ: pool by the stride, then append zero channels.
        shortcut = F.avg_pool2d(shortcut, self.stride, self.stride)
        return F.pad(shortcut, (0, 0, 0, 0, 0, out_channels - shortcut.shape[1]))


class BlockGroup(nn.Module):
    """A run of blocks at one width; the first one changes width and stride."""

    def __init__(self, n_blocks, in_channels, out_channels, stride, emb_dim, activate_shortcut=False):
        super().__init__()
        self.blocks = nn.ModuleList(
            ConditionalBlock(
                in_channels if i == 0 else out_channels,
                out_channels,
                stride if i == 0 else 1,
                emb_dim,
                activate_shortcut=activate_shortcut and i == 0,
            )
            for i in range(n_blocks)
        )

    def forward(self, x, emb):
        for block in self.blocks:
            x = block(x, emb)
        return x


class WideResNet(nn.Module):
    """Noise-conditional WideResNet classifier.

    Args:
        blocks_per_group: residual blocks in each of the three groups (4 for WRN-28-10).
        channel_multiplier: width factor; the groups have 16k, 32k and 64k channels (10 for WRN-28-10).
        num_classes: number of output logits.
        in_channels: image channels.
        n_frequencies: Gaussian Fourier frequencies of the noise embedding.
        fourier_scale: standard deviation of those frequencies.
        emb_dim: width of the noise embedding.
    """

    def __init__(self, blocks_per_group=4, channel_multiplier=10, num_classes=10, in_channels=3,
                 n_frequencies=128, fourier_scale=16.0, emb_dim=512):
        super().__init__()
        widths = [16 * channel_multiplier, 32 * channel_multiplier, 64 * channel_multiplier]
        self.time_emb = GaussianFourierFeatures(n_frequencies, fourier_scale)
        self.time_emb_mlp = nn.Sequential(
            nn.Linear(2 * n_frequencies, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.init_conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.group1 = BlockGroup(blocks_per_group, 16, widths[0], 1, emb_dim, activate_shortcut=True)
        self.group2 = BlockGroup(blocks_per_group, widths[0], widths[1], 2, emb_dim)
        self.group3 = BlockGroup(blocks_per_group, widths[1], widths[2], 2, emb_dim)
        self.pre_pool_bn = norm_relu(widths[2])
        self.final_linear = nn.Linear(widths[2], num_classes)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x, t):
        """Logits (B, num_classes) for images x (B, C, H, W) at noise conditioning t (B,)."""
        emb = self.time_emb_mlp(self.time_emb(t.to(x.dtype)))  # (B, emb_dim)
        h = self.init_conv(standardize_per_image(x))  # (B, 16, H, W)
        h = self.group1(h, emb)  # (B, 16k, H, W)
        h = self.group2(h, emb)  # (B, 32k, H/2, W/2)
        h = self.group3(h, emb)  # (B, 64k, H/4, W/4)
        h = self.pre_pool_bn(h).mean(dim=(2, 3))  # (B, 64k)
        return self.final_linear(h)
