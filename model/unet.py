"""The DDAE UNet: one class for the 35.7M DDPM UNet and the 56M DDPM++ UNet (see config/*.yaml)."""
import torch
from torch import nn

from model.blocks import Downsample, MiddleBlock, TimeEmbedding, UpDownBlock, Upsample


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

    The k-th block of the up path (its attention included) is the feature ``out_k``:
    ``forward(..., ret_activation=True)`` returns all of them, ``forward_features`` only the
    requested ones, stopping the network after the deepest.
    """

    feature_axis = 1  # the channels of a (B, C, H, W) activation

    def __init__(self, image_shape=(3, 32, 32), n_channels=128, ch_mults=(1, 2, 2, 2),
                 is_attn=(False, True, False, False), dropout=0.1, n_blocks=2,
                 use_res_for_updown=False, augment_dim=0):
        super().__init__()
        if len(is_attn) != len(ch_mults):
            raise ValueError(f"is_attn has {len(is_attn)} entries but ch_mults has {len(ch_mults)}")
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

        self.block_names = [f"out_{k}" for k in range(1, (n_blocks + 1) * n_levels + 1)]

    def _run(self, x, t, aug, wanted):
        """Run the network; ``wanted`` is None (full output) or the set of out_k names to return."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_emb(t, aug)  # (B, 4 * n_channels)

        h = self.image_proj(x)
        skips = [h]
        for module in self.down:
            h = module(h, temb)
            skips.append(h)
        h = self.middle(h, temb)

        activations = {}
        last_needed = None if wanted is None else max(self.block_names.index(n) for n in wanted)
        block_index = 0
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h, temb)
                continue
            h = module(torch.cat([h, skips.pop()], dim=1), temb)
            name = self.block_names[block_index]
            if wanted is None or name in wanted:
                activations[name] = h  # (B, C, H, W)
            if block_index == last_needed:
                return None, activations
            block_index += 1

        out = self.final(self.act(self.norm(h)))
        return out, activations

    def forward(self, x, t, aug=None, ret_activation=False):
        out, activations = self._run(x, t, aug, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, aug=None):
        """Return ``{name: (B, C, H, W)}`` for the requested blocks; later blocks are not run."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.block_names]
        if unknown:
            raise ValueError(f"unknown block {unknown[0]!r}; this network has "
                             f"{self.block_names[0]}..{self.block_names[-1]}")
        return self._run(x, t, aug, set(names))[1]
