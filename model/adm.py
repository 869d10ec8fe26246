"""OpenAI's ADM UNet (improved-diffusion's and guided-diffusion's ``UNetModel``) as a DDAE network, net_type ADM.

    curl -LO https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt
    python linear.py --config config/ADM_improved_cifar10.yaml --ckpt cifar10_uncond_50M_500K.pt --grid

The ``network`` keys are OpenAI's model flags with their names and meanings (``--num_channels 128`` is
``num_channels: 128``; ``attention_resolutions`` and ``channel_mult`` are the same comma-separated strings),
so a published MODEL_FLAGS line becomes a config by copying. The parameter names are OpenAI's: their
released .pt files, plain state dicts, load unchanged as ``--ckpt`` (``model.models.load_weights`` prefixes
``nn_model.``).

Timesteps. Our DDPM calls the network with t / n_T for t in 1..n_T; OpenAI's diffusion indexes its schedule
from 0, and our alphabar at t is its ``alphas_cumprod[t - 1]``. The network therefore recovers the index
t - 1 = round(t * n_T) - 1 (n_T is ``diffusion_steps``, which must equal ``diffusion.n_T``) and feeds the
UNet that index, or index * 1000 / diffusion_steps with ``rescale_timesteps`` (improved-diffusion's default).

Learned variance (``learn_sigma``): the UNet outputs 2C channels, the noise then v in [-1, 1].
``forward`` returns the noise channels, which the loss, DDIM and the features use;
``forward(..., with_variance=True)`` returns (noise, v) for the DDPM's ancestral sampler
(``DDPM._learned_variance_loop``, improved-diffusion's p_sample).

Blocks: ``input_k`` is the output of ``input_blocks[k]`` (k = 0 is the first convolution), ``middle`` of
``middle_block``, ``output_k`` of ``output_blocks[k]``, OpenAI's module indices; ``--grid`` probes the
``output_k``, the decoder.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.blocks import BlockRecorder
from model.schedules import published_index

# OpenAI's channel_mult for channel_mult "" by image_size (guided-diffusion's table; 32 is improved-diffusion's).
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
NUM_CLASSES = 1000  # class_cond: ImageNet's labels, as OpenAI's NUM_CLASSES
GROUPS = 32


def channel_multipliers(channel_mult, image_size):
    """The per-level multipliers of the ``channel_mult`` flag: "" picks OpenAI's for ``image_size``."""
    if channel_mult.strip() == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"channel_mult \"\" has no default for image_size {image_size}; OpenAI's defaults are "
                             f"for {', '.join(map(str, DEFAULT_CHANNEL_MULT))}: give channel_mult, e.g. \"1,2,2,2\"")
        return DEFAULT_CHANNEL_MULT[image_size]
    return tuple(int(part) for part in channel_mult.split(","))


def attention_factors(attention_resolutions, image_size):
    """The downsampling factors (image_size // resolution) at which OpenAI's UNet has attention."""
    return {image_size // int(part) for part in str(attention_resolutions).split(",") if part.strip()}


def timestep_embedding(timesteps, dim, max_period=10000):
    """(B, dim) sinusoidal embedding of (B,) float timesteps: cosines, then sines (OpenAI's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class Norm(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and returned in the input's dtype."""

    def __init__(self, channels):
        super().__init__(GROUPS, channels)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Resample(nn.Module):
    """Nearest 2x upsampling or 2x downsampling, with a 3x3 convolution (``conv_resample``) or without
    (down: average pooling). Its parameter is ``conv`` (up) or ``op`` (down), as OpenAI's."""

    def __init__(self, channels, up, use_conv):
        super().__init__()
        self.up = up
        if up and use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif not up:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        if not self.up:
            return self.op(x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class ResBlock(nn.Module):
    """Norm, SiLU, conv; plus the timestep embedding (added, or as scale and shift of the second norm with
    ``use_scale_shift_norm``); norm, SiLU, dropout, conv; plus the skip. ``resample`` "up" or "down"
    resamples both paths between the first SiLU and conv (``resblock_updown``)."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False,
                 resample=None, use_checkpoint=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(Norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = None if resample is None else Resample(channels, resample == "up", use_conv=False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm
                                                                                           else 1)))
        self.out_layers = nn.Sequential(Norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        # a 1x1 convolution when the width changes: UNetModel never asks for the 3x3 one
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.resample is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[:-1](x)
            h, x = self.resample(h), self.resample(x)
            h = self.in_layers[-1](h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H x W positions, residual. ``qkv`` holds, per position, either every head's
    (q, k, v) in turn (OpenAI's legacy order) or all q, then all k, then all v (``new_order``)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, new_order=False, use_checkpoint=False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.new_order = new_order
        self.use_checkpoint = use_checkpoint
        self.norm = Norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        b, c, height, width = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, width_per_head = self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (part.reshape(b * heads, width_per_head, -1) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * width_per_head, -1).split(width_per_head, dim=1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (BH, T, D)
        h = self.proj_out(h.transpose(1, 2).reshape(b, c, -1))
        return (x + h).reshape(b, c, height, width)


class EmbedSequential(nn.Sequential):
    """A sequence of layers; the residual blocks among them also take the timestep embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADM(nn.Module):
    """OpenAI's ADM UNet, built from its model flags; docs/DESIGN.md's network contract.

    Args:
        image_size: side of the square images.
        num_channels: width of the first level.
        num_res_blocks: residual blocks per level (the decoder has one more).
        channel_mult: comma-separated width multipliers per level; "" takes OpenAI's for ``image_size``.
        learn_sigma: the network also outputs the variance interpolation v (6 output channels).
        class_cond: a label embedding for 1000 classes (DDAE's unconditional feature pass gives no labels:
            refused in configs, see ``check_settings``).
        attention_resolutions: comma-separated resolutions (e.g. "16,8") that have self-attention; one
            resolution may be an int (16), as OpenAI's flag takes it.
        num_heads: attention heads (when ``num_head_channels`` is -1).
        num_head_channels: channels per attention head; -1 uses ``num_heads``.
        num_heads_upsample: heads of the decoder's attention; -1 is ``num_heads``.
        use_scale_shift_norm: the timestep embedding scales and shifts the residual blocks' second norm.
        dropout: dropout rate inside the residual blocks.
        resblock_updown: resample with residual blocks instead of convolutions.
        use_new_attention_order: split q, k, v before the heads (guided-diffusion's new order).
        use_checkpoint: gradient checkpointing of every block while gradients are computed.
        use_fp16: accepted so that OpenAI's flags copy unchanged; the precision is the scripts' ``--precision``.
        diffusion_steps: the steps the model was trained over (must equal ``diffusion.n_T``).
        rescale_timesteps: feed the UNet index * 1000 / diffusion_steps instead of the index
            (improved-diffusion's default True, guided-diffusion's False).
    """

    feature_axis = 1  # the channels of a (B, C, H, W) activation

    def __init__(self, image_size: int = 64, num_channels: int = 128, num_res_blocks: int = 2, channel_mult: str = "",
                 learn_sigma: bool = False, class_cond: bool = False, attention_resolutions: str | int = "16,8",
                 num_heads: int = 4, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = True, dropout: float = 0.0, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_checkpoint: bool = False, use_fp16: bool = False,
                 diffusion_steps: int = 1000, rescale_timesteps: bool = False):
        super().__init__()
        self.image_shape = (3, image_size, image_size)
        self.num_channels = num_channels
        self.learn_sigma = learn_sigma
        self.diffusion_steps = int(diffusion_steps)
        self.rescale_timesteps = rescale_timesteps
        mults = channel_multipliers(channel_mult, image_size)
        attention_at = attention_factors(attention_resolutions, image_size)
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_channels = num_channels * 4

        def res_block(channels, out_channels=None, resample=None):
            return ResBlock(channels, emb_channels, dropout, out_channels, use_scale_shift_norm, resample,
                            use_checkpoint)

        def attention(channels, heads):
            return AttentionBlock(channels, heads, num_head_channels, use_new_attention_order, use_checkpoint)

        def resampler(channels, direction):
            return res_block(channels, resample=direction) if resblock_updown else \
                Resample(channels, direction == "up", use_conv=True)

        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))
        if class_cond:
            self.label_emb = nn.Embedding(NUM_CLASSES, emb_channels)
        ch = int(mults[0] * num_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_channels, factor = [ch], 1
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * num_channels))]
                ch = int(mult * num_channels)
                if factor in attention_at:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(EmbedSequential(resampler(ch, "down")))
                skip_channels.append(ch)
                factor *= 2
        self.middle_block = EmbedSequential(res_block(ch), attention(ch, num_heads), res_block(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(num_channels * mult))]
                ch = int(num_channels * mult)
                if factor in attention_at:
                    layers.append(attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(resampler(ch, "up"))
                    factor //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(Norm(ch), nn.SiLU(), nn.Conv2d(ch, 6 if learn_sigma else 3, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

        self.grid_blocks = [f"output_{k}" for k in range(len(self.output_blocks))]
        self.block_names = [f"input_{k}" for k in range(len(self.input_blocks))] + ["middle"] + self.grid_blocks

    @staticmethod
    def check_settings(cfg, require):
        """Cross-key checks of the ``network`` section against the rest of the config, at config load."""
        net = cfg.network
        require(cfg.model_type == "DDPM", "model_type", f"must be DDPM for net_type ADM (an epsilon-predicting "
                f"network on OpenAI's discrete timesteps), got {cfg.model_type!r}")
        require(net.diffusion_steps == cfg.diffusion.n_T, "network.diffusion_steps",
                f"must equal diffusion.n_T ({cfg.diffusion.n_T}), the steps the model was trained over; got "
                f"{net.diffusion_steps}")
        require(not net.class_cond, "network.class_cond", "must be False: DDAE's feature pass and samplers give no "
                "class labels; use an unconditional checkpoint (e.g. 256x256_diffusion_uncond.pt)")
        for key in ("image_size", "num_channels", "num_res_blocks"):
            require(net[key] >= 1, f"network.{key}", f"must be at least 1, got {net[key]}")
        require(0.0 <= net.dropout < 1.0, "network.dropout", f"must be in [0, 1), got {net.dropout}")
        try:
            mults = channel_multipliers(net.channel_mult, net.image_size)
        except ValueError as err:
            require(False, "network.channel_mult", f"{err} (got {net.channel_mult!r})")
        require(net.image_size % 2 ** (len(mults) - 1) == 0, "network.image_size",
                f"must be a multiple of {2 ** (len(mults) - 1)} for {len(mults)} levels, got {net.image_size}")
        widths = [int(m * net.num_channels) for m in mults]
        require(all(w >= GROUPS and w % GROUPS == 0 for w in widths), "network.num_channels",
                f"times every channel_mult must be a multiple of {GROUPS} (GroupNorm's groups); widths {widths}")
        value = net.attention_resolutions  # a string, or one int (YAML reads --set ...=16 as one)
        try:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(value)
            resolutions = [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            resolutions = [0]
        require(all(r >= 1 and net.image_size % r == 0 for r in resolutions), "network.attention_resolutions",
                f"must be comma-separated divisors of image_size {net.image_size} (e.g. \"16,8\" or 16), got "
                f"{type(value).__name__} {value!r}")
        for key, heads in (("num_heads", net.num_heads), ("num_heads_upsample", net.num_heads_upsample)):
            if net.num_head_channels == -1 and not (key == "num_heads_upsample" and heads == -1):
                require(heads >= 1 and all(w % heads == 0 for w in widths), f"network.{key}",
                        f"must divide every width {widths}, got {heads}")
        if net.num_head_channels != -1:
            require(net.num_head_channels >= 1 and all(w % net.num_head_channels == 0 for w in widths),
                    "network.num_head_channels", f"must be -1 or divide every width {widths}, got "
                    f"{net.num_head_channels}")

    def unet_timesteps(self, t, batch_size):
        """(B,) float timesteps for the UNet from our t / n_T: the index round(t * n_T) - 1 of OpenAI's
        schedule (our t = 1 is index 0), times 1000 / diffusion_steps with ``rescale_timesteps``."""
        index = published_index(t, self.diffusion_steps, batch_size)
        return index * (1000.0 / self.diffusion_steps) if self.rescale_timesteps else index

    def _run(self, x, t, wanted, y=None):
        """The UNet, block by block; ``wanted`` as BlockRecorder's. Returns (2C or C output or None, activations)."""
        recorder = BlockRecorder(self.block_names, wanted, self.grid_blocks)
        emb = self.time_embed(timestep_embedding(self.unet_timesteps(t, x.shape[0]).to(x.device), self.num_channels))
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("a class-conditional ADM (class_cond) needs labels y")
            emb = emb + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
            if recorder.keep(h):
                return None, recorder.activations
        h = self.middle_block(h, emb)
        if recorder.keep(h):
            return None, recorder.activations
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if recorder.keep(h):
                return None, recorder.activations
        return self.out(h), recorder.activations

    def forward(self, x, t, aug=None, ret_activation=False, with_variance=False, y=None):
        """``x`` (B, 3, H, W) noisy images in [-1, 1], ``t`` (B,) or a scalar: our timestep / n_T.

        Returns the noise prediction (B, 3, H, W); with ``with_variance`` (learn_sigma) the pair (noise, v),
        v (B, 3, H, W) the log-variance interpolation in [-1, 1]; with ``ret_activation`` also the
        ``{output_k: (B, C, H, W)}`` activations.
        """
        if aug is not None:
            raise ValueError("an ADM network takes no augmentation labels")
        out, activations = self._run(x, t, None, y)
        eps, v = out[:, :3], (out[:, 3:] if self.learn_sigma else None)
        result = (eps, v) if with_variance else eps
        return (result, activations) if ret_activation else result

    def forward_features(self, x, t, names, aug=None):
        """Return ``{name: (B, C, H, W)}`` for the requested blocks; later blocks are not run."""
        if aug is not None:
            raise ValueError("an ADM network takes no augmentation labels")
        return self._run(x, t, names)[1]

    def stages(self, block):
        """The modules that compute ``block``, in running order, for finetune.py's layer decay:
        ``[(name, [modules])]``: "embedding" (which input_0, the first convolution, does not use), one stage per
        input block, "middle", one per output block."""
        embedding = [self.time_embed] + ([self.label_emb] if hasattr(self, "label_emb") else [])
        stages = [(f"input_{k}", [b]) for k, b in enumerate(self.input_blocks)]
        stages += [("middle", [self.middle_block])]
        stages += [(f"output_{k}", [b]) for k, b in enumerate(self.output_blocks)]
        stages = stages[:self.block_names.index(block) + 1]
        return stages if len(stages) == 1 else [stages[0], ("embedding", embedding), *stages[1:]]
