"""The DDAE UNet: one class for the 35.7M DDPM UNet and the 56M DDPM++ UNet (see config/*.yaml)."""
import torch
from torch import nn

from model.blocks import BlockRecorder, Downsample, MiddleBlock, TimeEmbedding, UpDownBlock, Upsample


class UNet(nn.Module):
    """Noise-conditional UNet whose decoder blocks double as feature extractors.

    Args:
        image_shape: (C, H, W) of the images.
        n_channels: base width; level i has ``n_channels * ch_mults[i]`` channels.
        ch_mults: width multiplier per resolution level.
        is_attn: whether each level's blocks end with self-attention.
        dropout: dropout rate inside the residual blocks.
        n_blocks: residual blocks per level on the down path (the up path has one more).
        use_res_for_updown: BigGAN-style residual resampling blocks (DDPM++) instead of convs.
        augment_dim: size of the EDM augmentation labels fed to the time embedding; 0 for none.

    Probe-able blocks, in the order the network runs them (``block_names``): ``in_k``, the k-th residual
    block of the down path; ``mid``, the middle block; ``out_k``, the k-th block of the up path (its
    attention included). ``forward(..., ret_activation=True)`` returns the ``out_k`` (the original's
    features, also ``grid_blocks``, what ``--grid`` probes), ``forward_features`` the requested ones,
    stopping the network after the deepest.
    """

    feature_axis = 1  # the channels of a (B, C, H, W) activation

    def __init__(self, image_shape: list[int] = (3, 32, 32), n_channels: int = 128,
                 ch_mults: list[int] = (1, 2, 2, 2), is_attn: list[bool] = (False, True, False, False),
                 dropout: float = 0.1, n_blocks: int = 2, use_res_for_updown: bool = False, augment_dim: int = 0):
        super().__init__()
        if len(is_attn) != len(ch_mults):
            raise ValueError(f"is_attn has {len(is_attn)} entries but ch_mults has {len(ch_mults)}")
        self.image_shape = tuple(image_shape)  # (C, H, W)
        image_channels = image_shape[0]
        time_channels = n_channels * 4
        n_levels = len(ch_mults)

        self.image_proj = nn.Conv2d(image_channels, n_channels, kernel_size=3, padding=1)
        self.augment_dim = augment_dim
        self.time_emb = TimeEmbedding(n_channels, augment_dim)

        down = []
        skip_channels = [n_channels]
        channels = n_channels
        for level in range(n_levels):
            out_channels = n_channels * ch_mults[level]
            for _ in range(n_blocks):
                down.append(UpDownBlock(channels, out_channels, time_channels, is_attn[level], dropout))
                channels = out_channels
                skip_channels.append(channels)
            if level < n_levels - 1:
                down.append(Downsample(channels, time_channels, dropout, use_res_for_updown))
                skip_channels.append(channels)
        self.down = nn.ModuleList(down)

        self.middle = MiddleBlock(channels, time_channels, dropout)

        up = []
        for level in reversed(range(n_levels)):
            out_channels = n_channels * ch_mults[level]
            for _ in range(n_blocks + 1):
                up.append(UpDownBlock(channels + skip_channels.pop(), out_channels, time_channels,
                                      is_attn[level], dropout))
                channels = out_channels
            if level > 0:
                up.append(Upsample(channels, time_channels, dropout, use_res_for_updown))
        self.up = nn.ModuleList(up)

        self.norm = nn.GroupNorm(8, channels)
        self.act = nn.SiLU()
        self.final = nn.Conv2d(channels, image_channels, kernel_size=3, padding=1)

        self.grid_blocks = [f"out_{k}" for k in range(1, (n_blocks + 1) * n_levels + 1)]
        self.block_names = [f"in_{k}" for k in range(1, n_blocks * n_levels + 1)] + ["mid"] + self.grid_blocks

    @staticmethod
    def check_settings(cfg, require):
        """Cross-key checks of the ``network`` section, at config load."""
        net = cfg.network
        require(len(net.image_shape) == 3 and all(n > 0 for n in net.image_shape), "network.image_shape",
                f"must be [channels, height, width] of positive ints, got {net.image_shape}")
        require(len(net.ch_mults) > 0 and all(m > 0 for m in net.ch_mults), "network.ch_mults",
                f"must be a non-empty list of positive ints, got {net.ch_mults}")
        require(len(net.is_attn) == len(net.ch_mults), "network.is_attn",
                f"must have one entry per resolution, as many as network.ch_mults ({len(net.ch_mults)}), "
                f"got {len(net.is_attn)}")
        require(net.n_channels > 0 and all(net.n_channels * m % 32 == 0 for m in net.ch_mults),
                "network.n_channels", f"times every network.ch_mults entry must be a positive multiple of 32 "
                                      f"(GroupNorm of 32 groups), got {net.n_channels}")
        scale = 2 ** (len(net.ch_mults) - 1)
        require(all(size % scale == 0 for size in net.image_shape[1:]), "network.image_shape",
                f"height and width must be divisible by {scale} for {len(net.ch_mults)} resolutions, "
                f"got {net.image_shape}")
        require(0.0 <= net.dropout < 1.0, "network.dropout", f"must be in [0, 1), got {net.dropout}")
        require(net.n_blocks >= 1, "network.n_blocks", f"must be at least 1, got {net.n_blocks}")
        require(net.augment_dim >= 0, "network.augment_dim", f"must be 0 or positive, got {net.augment_dim}")

    def _run(self, x, t, aug, wanted):
        """Run the network; ``wanted`` is None (full output and the out_k) or the block names to return."""
        recorder = BlockRecorder(self.block_names, wanted, self.grid_blocks)
        keep, activations = recorder.keep, recorder.activations  # activations: {name: (B, C, H, W)}
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_emb(t, aug)  # (B, 4 * n_channels)
        h = self.image_proj(x)
        skips = [h]
        for module in self.down:
            h = module(h, temb)
            skips.append(h)
            if not isinstance(module, Downsample) and keep(h):
                return None, activations
        h = self.middle(h, temb)
        if keep(h):
            return None, activations
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h, temb)
            elif keep(h := module(torch.cat([h, skips.pop()], dim=1), temb)):
                return None, activations

        out = self.final(self.act(self.norm(h)))
        return out, activations

    def stages(self, block):
        """The modules that compute ``block``, grouped in the order the network runs them (fine-tuning's
        layer-wise learning-rate decay): "embedding" (input convolution and time embedding), then "down.i",
        "middle" and "up.i" as far as ``block`` needs (resamplers included)."""
        modules = [("embedding", [self.image_proj, self.time_emb])]
        modules += [(f"down.{i}", [m]) for i, m in enumerate(self.down)] + [("middle", [self.middle])]
        modules += [(f"up.{i}", [m]) for i, m in enumerate(self.up)]
        blocks_left, stages = self.block_names.index(block) + 1, []
        for name, group in modules:
            stages.append((name, group))
            if name != "embedding" and not isinstance(group[0], (Downsample, Upsample)):
                blocks_left -= 1
                if blocks_left == 0:
                    break
        return stages

    def forward(self, x, t, aug=None, ret_activation=False):
        out, activations = self._run(x, t, aug, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, aug=None):
        """Return ``{name: (B, C, H, W)}`` for the requested blocks; later blocks are not run."""
        return self._run(x, t, aug, names)[1]
