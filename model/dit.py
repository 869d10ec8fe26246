"""DiT (Peebles & Xie 2023) and its Gaussian diffusion, for DDAE's transfer evaluation of a pre-trained DiT-XL/2.

    diffusion = DiTDiffusion(DiT(**cfg.network), **cfg.diffusion)   # config/DiT_XL_2_cifar.yaml
    diffusion.nn_model.load_state_dict(torch.load("DiT-XL-2-256x256.pt", weights_only=True))
    feats = diffusion.get_feature(latents, t=121, name="layer-13")   # (B, 1152), latents (B, 4, 32, 32)

The parameter names are facebookresearch/DiT's, so its released checkpoints (plain state dicts) load
unchanged. The network works on VAE latents; ``utils/latents.py`` makes and reads them.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import BlockRecorder
from model.ddpm import check_steps_and_betas, pool_features, requested_blocks
from model.noise import noise_like

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP
MAX_PERIOD = 10000


def modulate(x, shift, scale):
    """adaLN: ``x`` (B, T, D) normalised tokens, ``shift`` and ``scale`` (B, D) per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=MAX_PERIOD):
    """(B,) timesteps (integers or fractions) -> (B, dim) features: cosines, then sines, of t times
    frequencies from 1 down to 1 / max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_1d(dim, positions):
    """(M,) positions -> (M, dim) float64: sines, then cosines, of positions times 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, grid_size):
    """Fixed 2D position embedding of a grid_size x grid_size token grid, row-major: (grid_size^2, dim).

    The first half of each vector encodes the column (x), the second half the row (y).
    """
    coords = np.arange(grid_size, dtype=np.float32)
    x, y = np.meshgrid(coords, coords)  # x varies along a row
    return np.concatenate([sincos_1d(dim // 2, x), sincos_1d(dim // 2, y)], axis=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a (B, C, H, W) input -> (B, H*W/p^2, D) tokens."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps -> (B, D) via sinusoidal features and a two-layer SiLU MLP."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D); row ``num_classes`` is the null class of classifier-free guidance.

    In training mode each label is replaced by the null class with probability ``dropout_prob``.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are shifted, scaled and gated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer on (C, H, W) latents, conditioned on a timestep and a class label.

    Args:
        input_size: side of the latent (32 for 256x256 images through the SD VAE).
        patch_size: side of a patch; the network has (input_size / patch_size)^2 tokens.
        in_channels: latent channels.
        hidden_size: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP width over D.
        class_dropout_prob: label dropout of training; > 0 adds the null class (index num_classes).
        num_classes: class labels.
        learn_sigma: predict a variance as well: 2 * in_channels output channels.

    Block k's output (0-based) is the feature ``layer-k``, (B, T, D) (docs/DESIGN.md, Network contract).
    """

    feature_axis = -1  # the channels of a (B, T, D) activation

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.in_channels = in_channels
        self.image_shape = (in_channels, input_size, input_size)  # (C, H, W) of a latent
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed, yet a parameter as in the original, so that its checkpoints (which hold it) load strictly.
        pos_embed = torch.from_numpy(sincos_2d(hidden_size, grid)).float().unsqueeze(0)  # (1, T, D)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.block_names = [f"layer-{k}" for k in range(depth)]

    @staticmethod
    def check_settings(cfg, require):
        """Cross-key checks of the ``network`` section, at config load."""
        net = cfg.network
        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            require(net[key] >= 1, f"network.{key}", f"must be at least 1, got {net[key]}")
        require(net.input_size % net.patch_size == 0, "network.input_size",
                f"must be a multiple of network.patch_size ({net.patch_size}), got {net.input_size}")
        require(net.hidden_size % net.num_heads == 0, "network.hidden_size",
                f"must be a multiple of network.num_heads ({net.num_heads}), got {net.hidden_size}")
        require(net.mlp_ratio > 0, "network.mlp_ratio", f"must be positive, got {net.mlp_ratio}")
        require(0.0 <= net.class_dropout_prob < 1.0, "network.class_dropout_prob",
                f"must be in [0, 1), got {net.class_dropout_prob}")

    @property
    def null_class(self):
        return self.num_classes

    def _condition(self, t, y, batch, device):
        """(B, D) conditioning: timestep embedding plus label embedding (the null class when y is None)."""
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if y is None:
            y = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return self.t_embedder(t) + self.y_embedder(y)

    def unpatchify(self, x):
        """(B, T, p*p*C) tokens -> (B, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        side = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, side * p, side * p)

    def _run(self, x, t, y, wanted):
        """Run the network; ``wanted`` is None (full output and every block) or the layer-k names to return."""
        recorder = BlockRecorder(self.block_names, wanted)
        c = self._condition(t, y, x.shape[0], x.device)
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        for block in self.blocks:
            if recorder.keep(h := block(h, c)):
                return None, recorder.activations
        return self.unpatchify(self.final_layer(h, c)), recorder.activations

    def forward(self, x, t, y=None, ret_activation=False):
        """``x`` (B, C, H, W) noisy latents, ``t`` (B,) timesteps in 0..999, ``y`` (B,) labels (None:
        the null class). Returns (B, out_channels, H, W): the noise, then (learn_sigma) the variance."""
        out, activations = self._run(x, t, y, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, y=None):
        """Return ``{name: (B, T, D)}`` for the requested blocks; later blocks are not run."""
        return self._run(x, t, y, names)[1]


def linear_alphas_cumprod(betas=(1e-4, 0.02), n_T=1000):
    """DiT's "linear" schedule: alphabar_t for t = 0..n_T-1, float64, betas scaled to 1000 steps."""
    scale = 1000 / n_T
    beta = np.linspace(scale * betas[0], scale * betas[1], n_T, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - beta))


class DiTDiffusion(nn.Module):
    """DiT's Gaussian diffusion around a ``DiT``, for features: the diffusion contract of
    docs/DESIGN.md on latents instead of images.

    Args:
        nn_model: a ``DiT``.
        betas: (first, last) beta of the linear schedule over 1000 steps.
        n_T: number of diffusion steps; timesteps are 0..n_T-1.
    """

    on_latents = True
    TRAINING_KEYS = ("betas", "n_T")  # what the network learnt; a checkpoint refuses other values
    probe_grid = (41, 81, 121, 161, 201)  # our choice, around DiT's probe defaults t = 81 and 121

    def __init__(self, nn_model, betas: list[float] = (1e-4, 0.02), n_T: int = 1000):
        super().__init__()
        self.nn_model = nn_model
        self.n_T = int(n_T)
        self.betas = tuple(float(b) for b in betas)
        alphas_cumprod = linear_alphas_cumprod(self.betas, self.n_T)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        # float64 square roots, cast to float32 when indexed, as the original's q_sample does
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt(), persistent=False)

    @staticmethod
    def check_settings(cfg, require):
        """Checks of the ``diffusion`` section, at config load."""
        check_steps_and_betas(cfg.diffusion, require)

    @staticmethod
    def feature_timesteps(settings):
        """(lowest, highest, what) timestep ``get_feature`` takes."""
        return 0, settings["n_T"] - 1, "DiT's timesteps, below diffusion.n_T"

    def _timesteps(self, t, batch_size, device):
        if isinstance(t, int):
            if not 0 <= t < self.n_T:
                raise ValueError(f"DiT timestep {t} is outside 0..{self.n_T - 1}")
            return torch.full((batch_size,), t, dtype=torch.long, device=device)
        return t.to(device=device, dtype=torch.long).expand(batch_size)

    def q_sample(self, x, t, noise):
        """sqrt(alphabar_t) x + sqrt(1 - alphabar_t) noise for (B,) timesteps ``t``."""
        a = self.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1)
        b = self.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return a * x + b * noise

    def get_feature(self, x0, t, name=None, norm=False, noise=None, tokens=False):
        """``DDPM.get_feature`` (the other arguments and the result are its), token-averaged, with the null label.

        Args:
            x0: (B, C, H, W) clean latents (the VAE's, already scaled by 0.18215).
            t: int or (B,) integer tensor of timesteps in 0..n_T-1.
        """
        t = self._timesteps(t, x0.shape[0], x0.device)
        x_t = self.q_sample(x0, t, noise_like(noise, x0))
        names = requested_blocks(self.nn_model, name)
        activations = self.nn_model.forward_features(x_t, t, names)
        return pool_features(activations, name, norm, self.nn_model.feature_axis, tokens)  # (B, D): averaged over T
