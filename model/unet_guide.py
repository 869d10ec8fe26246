"""The class-conditional UNet of the author's sister codebase (FutureXiang/Diffusion's UNet_guide): the DDAE UNet
with a class embedding beside the time embedding, both scaling and shifting each residual block's second norm.

    net = UNet_guide(n_classes=10)                     # config/cifar_conditional.yaml's network: 38.6M
    eps = net(x, t, labels, drop_mask)                 # drop_mask (B,): 1 drops the label (the null label)
    feats = net.forward_features(x, t, ["out_6"])      # no labels: the null label (unconditional features)

State-dict names are the sister code's, so its checkpoints load unchanged; tests/test_guide.py compares outputs
and blocks with tensors its own code recorded (bench/guide_golden.py).
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from model import blocks
from model.blocks import BlockRecorder, TimeEmbedding
from model.unet import UNet
from utils.config import Settings

__all__ = ["UNet_guide", "ClassEmbedding"]


class ClassEmbedding(nn.Module):
    """A label as a one-hot vector (zero when dropped: the null label), then a two-layer MLP.

    The sister code multiplies the kept one-hot vectors by -1 (its mask flip); the sign is kept, as the
    published weights were trained with it.
    """

    def __init__(self, n_classes, n_channels):
        super().__init__()
        self.n_classes = n_classes
        self.lin1 = nn.Linear(n_classes, n_channels)
        self.act = nn.SiLU()
        self.lin2 = nn.Linear(n_channels, n_channels)

    def forward(self, c, drop_mask):
        one_hot = F.one_hot(c, num_classes=self.n_classes).to(self.lin1.weight.dtype)  # (B, n_classes)
        keep = (drop_mask.to(one_hot.dtype) - 1)[:, None]  # -1 for a kept label, 0 for a dropped one
        return self.lin2(self.act(self.lin1(one_hot * keep)))


class ResidualBlock(blocks.ResidualBlock):
    """``model.blocks.ResidualBlock`` with the time embedding as a scale and a class embedding as a shift:
    GroupNorm-SiLU-conv, GroupNorm, t * h + c, SiLU-dropout-conv, plus the shortcut (the sister code's block)."""

    def __init__(self, in_channels, out_channels, time_channels, dropout=0.1, up=False, down=False):
        super().__init__(in_channels, out_channels, time_channels, dropout, up, down)
        self.class_emb = nn.Sequential(nn.SiLU(), nn.Linear(time_channels, out_channels))

    def forward(self, x, temb, cemb):
        h = self.norm2(self.conv1(blocks.resample(self.act1(self.norm1(x)), self.up, self.down)))
        h = self.time_emb(temb)[:, :, None, None] * h + self.class_emb(cemb)[:, :, None, None]
        return self.conv2(self.act2(h)) + self.shortcut(blocks.resample(x, self.up, self.down))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with ``n_channels // d_k`` heads of ``d_k`` channels (one head of
    all channels when ``d_k`` is None), with a residual connection; each head's q, k, v are adjacent in the
    projection's output, as in the sister code."""

    def __init__(self, n_channels, d_k=None):
        super().__init__()
        self.d_k = n_channels if d_k is None else d_k
        self.n_heads = n_channels // self.d_k
        self.norm = nn.GroupNorm(32, n_channels)
        self.projection = nn.Linear(n_channels, self.n_heads * self.d_k * 3)
        self.output = nn.Linear(self.n_heads * self.d_k, n_channels)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        qkv = self.projection(tokens).view(b, h * w, self.n_heads, 3 * self.d_k).transpose(1, 2)  # (B, heads, HW, 3d)
        q, k, v = qkv.chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d_k)
        out = self.output(attended.transpose(1, 2).reshape(b, h * w, self.n_heads * self.d_k))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class ResAttBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_channels, has_attn, d_k, dropout):
        super().__init__()
        self.res = ResidualBlock(in_channels, out_channels, time_channels, dropout)
        self.attn = AttentionBlock(out_channels, d_k) if has_attn else nn.Identity()

    def forward(self, x, temb, cemb):
        return self.attn(self.res(x, temb, cemb))


class MiddleBlock(nn.Module):
    def __init__(self, n_channels, time_channels, d_k, dropout):
        super().__init__()
        self.res1 = ResidualBlock(n_channels, n_channels, time_channels, dropout)
        self.attn = AttentionBlock(n_channels, d_k)
        self.res2 = ResidualBlock(n_channels, n_channels, time_channels, dropout)

    def forward(self, x, temb, cemb):
        return self.res2(self.attn(self.res1(x, temb, cemb)), temb, cemb)


class Resample(nn.Module):
    """Halve or double the resolution: a strided conv / nearest + conv (``conv``), or a resampling residual
    block (``op``, with ``use_res``)."""

    def __init__(self, n_channels, time_channels, dropout, use_res, up):
        super().__init__()
        self.up = up
        if use_res:
            self.op = ResidualBlock(n_channels, n_channels, time_channels, dropout, up=up, down=not up)
        else:
            self.conv = nn.Conv2d(n_channels, n_channels, kernel_size=3, stride=1 if up else 2, padding=1)

    def forward(self, x, temb, cemb):
        if hasattr(self, "op"):
            return self.op(x, temb, cemb)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNet_guide(nn.Module):
    """Class-conditional UNet (the sister codebase's ``UNet_guide``), behind our network contract.

    Args:
        image_shape, n_channels, ch_mults, is_attn, dropout, n_blocks, use_res_for_updown: as ``model.unet.UNet``.
        attn_channels_per_head: channels of each attention head; None: one head of all channels.
        n_classes: number of classes; label ``c`` in 0..n_classes-1, and ``drop_mask`` 1 replaces it by the
            null label (a zero one-hot vector).

    ``forward(x, t, c, drop_mask)`` as the sister code calls it; ``forward_features(x, t, names, c=None,
    drop_mask=None)`` without labels reads the null label. Blocks ``in_k``, ``mid``, ``out_k`` as our UNet's.
    """

    feature_axis = 1

    def __init__(self, image_shape: list[int] = (3, 32, 32), n_channels: int = 128,
                 ch_mults: list[int] = (1, 2, 2, 2), is_attn: list[bool] = (False, True, False, False),
                 attn_channels_per_head: int = None, dropout: float = 0.1, n_blocks: int = 2,
                 use_res_for_updown: bool = False, n_classes: int = 10):
        super().__init__()
        if len(is_attn) != len(ch_mults):
            raise ValueError(f"is_attn has {len(is_attn)} entries but ch_mults has {len(ch_mults)}")
        self.image_shape = tuple(image_shape)
        self.num_classes = n_classes  # the sister code's name, read by its samplers and ours
        time_channels = n_channels * 4
        n_levels = len(ch_mults)
        d_k = attn_channels_per_head

        self.image_proj = nn.Conv2d(image_shape[0], n_channels, kernel_size=3, padding=1)
        self.time_emb = TimeEmbedding(n_channels)
        self.class_emb = ClassEmbedding(n_classes, time_channels)

        down, skip_channels, channels = [], [n_channels], n_channels
        for level in range(n_levels):
            out_channels = n_channels * ch_mults[level]
            for _ in range(n_blocks):
                down.append(ResAttBlock(channels, out_channels, time_channels, is_attn[level], d_k, dropout))
                channels = out_channels
                skip_channels.append(channels)
            if level < n_levels - 1:
                down.append(Resample(channels, time_channels, dropout, use_res_for_updown, up=False))
                skip_channels.append(channels)
        self.down = nn.ModuleList(down)
        self.middle = MiddleBlock(channels, time_channels, d_k, dropout)
        up = []
        for level in reversed(range(n_levels)):
            out_channels = n_channels * ch_mults[level]
            for _ in range(n_blocks + 1):
                up.append(ResAttBlock(channels + skip_channels.pop(), out_channels, time_channels, is_attn[level],
                                      d_k, dropout))
                channels = out_channels
            if level > 0:
                up.append(Resample(channels, time_channels, dropout, use_res_for_updown, up=True))
        self.up = nn.ModuleList(up)
        self.norm = nn.GroupNorm(8, channels)
        self.act = nn.SiLU()
        self.final = nn.Conv2d(channels, image_shape[0], kernel_size=3, padding=1)

        self.grid_blocks = [f"out_{k}" for k in range(1, (n_blocks + 1) * n_levels + 1)]
        self.block_names = [f"in_{k}" for k in range(1, n_blocks * n_levels + 1)] + ["mid"] + self.grid_blocks

    @staticmethod
    def check_settings(cfg, require):
        """``model.unet.UNet``'s checks, plus the classes and attention heads."""
        net = cfg.network
        UNet.check_settings(SimpleNamespace(network=Settings(net, augment_dim=0)), require)  # it has no augment_dim
        require(net.n_classes >= 1, "network.n_classes", f"must be at least 1, got {net.n_classes}")
        require(net.n_classes == cfg.classes, "network.n_classes",
                f"must equal the dataset's classes ({cfg.classes} for dataset {cfg.dataset}), got {net.n_classes}")
        d_k = net.attn_channels_per_head
        widths = [net.n_channels * m for m, attn in zip(net.ch_mults, net.is_attn) if attn]
        widths.append(net.n_channels * net.ch_mults[-1])  # the middle block's attention
        require(d_k is None or (d_k > 0 and all(c % d_k == 0 for c in widths)), "network.attn_channels_per_head",
                f"must divide the width of every attention block ({sorted(set(widths))}), got {d_k}")

    def stages(self, block):
        """As ``UNet.stages``: "embedding" (input convolution, time and class embeddings), then "down.i",
        "middle" and "up.i" as far as ``block`` needs (resamplers included)."""
        modules = [("embedding", [self.image_proj, self.time_emb, self.class_emb])]
        modules += [(f"down.{i}", [m]) for i, m in enumerate(self.down)] + [("middle", [self.middle])]
        modules += [(f"up.{i}", [m]) for i, m in enumerate(self.up)]
        blocks_left, stages = self.block_names.index(block) + 1, []
        for name, group in modules:
            stages.append((name, group))
            if name != "embedding" and not isinstance(group[0], Resample):
                blocks_left -= 1
                if blocks_left == 0:
                    break
        return stages

    def null_labels(self, batch_size, device):
        """(labels, drop_mask) of the null label for a batch: class 0, dropped."""
        return (torch.zeros(batch_size, dtype=torch.long, device=device),
                torch.ones(batch_size, device=device))

    def _run(self, x, t, c, drop_mask, wanted):
        recorder = BlockRecorder(self.block_names, wanted, self.grid_blocks)
        keep, activations = recorder.keep, recorder.activations  # activations: {name: (B, C, H, W)}
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if c is None:
            c, drop_mask = self.null_labels(x.shape[0], x.device)
        temb = self.time_emb(t)  # (B, 4 * n_channels)
        cemb = self.class_emb(c, drop_mask)  # (B, 4 * n_channels)
        h = self.image_proj(x)
        skips = [h]
        for module in self.down:
            h = module(h, temb, cemb)
            skips.append(h)
            if not isinstance(module, Resample) and keep(h):
                return None, activations
        h = self.middle(h, temb, cemb)
        if keep(h):
            return None, activations
        for module in self.up:
            if isinstance(module, Resample):
                h = module(h, temb, cemb)
            elif keep(h := module(torch.cat([h, skips.pop()], dim=1), temb, cemb)):
                return None, activations
        return self.final(self.act(self.norm(h))), activations

    def forward(self, x, t, c=None, drop_mask=None, ret_activation=False):
        out, activations = self._run(x, t, c, drop_mask, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, c=None, drop_mask=None):
        """``{name: (B, C, H, W)}`` for the requested blocks, with labels ``c`` (None: the null label)."""
        return self._run(x, t, c, drop_mask, names)[1]
