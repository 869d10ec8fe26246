"""U-ViT (Bao et al. 2023), the 44.3M pixel-space transformer of DDAE's sister codebase FutureXiang/Diffusion.

    python train.py --config config/cifar_unconditional_vit.yaml   # net_type: UViT, AdamW (optim_args)

The constructor keywords are that codebase's ``network`` keys and the parameter names its (timm-built) model's,
so its configs and checkpoints load unchanged; tests/test_uvit.py compares with its code on golden tensors.
Tokens: [label token,] time token, then the image's patches; the long skips join in-block k with the out-block
that mirrors it (the last in-block feeds the first out-block).
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.adm import timestep_embedding
from model.blocks import BlockRecorder


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, D) tokens, one q/k/v projection without bias (timm's layout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; an out-block (``skip``) first fuses its long skip by a linear layer."""

    def __init__(self, dim, num_heads, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):  # (B, T, D), (B, T, D) or None
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): one token per p x p patch, row by row."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    """Patch tokens back to an image: norm, a linear layer to p*p*C values per token, then a 3x3 convolution."""

    def __init__(self, dim, patch_size, channels, conv=True):
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else nn.Identity()

    def forward(self, x):  # (B, T, D) patch tokens -> (B, C, H, W)
        b, t, _ = x.shape
        p, c, side = self.patch_size, self.channels, int(round(t ** 0.5))
        x = self.linear(self.norm(x)).view(b, side, side, p, p, c)  # a token's values: (row, column, channel)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, side * p, side * p)
        return self.conv(x)


class UViT(nn.Module):
    """U-ViT: transformer blocks over the time token and image patches with long skips, predicting the noise.

    Args:
        image_shape: (C, H, W) of the (square) images.
        embed_dim: token width.
        patch_size: side of a patch; H must be a multiple of it.
        depth: in-blocks and out-blocks are depth // 2 each, plus the mid block.
        num_heads: attention heads; embed_dim must be a multiple of it.
        final_conv: a 3x3 convolution after the patches are put back together.
        skip: the out-blocks take the long skips.
        n_classes: -1 for unconditional; else a label token from n_classes + 1 embeddings (the last is the
            null label: classifier-free guidance's unconditional branch).

    Probe-able blocks (``block_names``): ``in_1 .. in_K`` (in_blocks.0 .. K-1), ``mid`` (mid_block),
    ``out_1 .. out_K`` (out_blocks.0 .. K-1, the ones with the long skips); ``grid_blocks`` are all of them. An
    activation is the block's patch tokens (B, H/p * W/p, D), the time and label tokens left out.
    """

    feature_axis = -1  # the width of a (B, T, D) activation

    def __init__(self, image_shape: list[int] = (3, 32, 32), embed_dim: int = 512, patch_size: int = 2,
                 depth: int = 12, num_heads: int = 8, final_conv: bool = True, skip: bool = True,
                 n_classes: int = -1):
        super().__init__()
        channels, height, width = image_shape
        if height != width or height % patch_size:
            raise ValueError(f"image_shape {list(image_shape)} must be square with sides a multiple of "
                             f"patch_size {patch_size}")
        self.image_shape = tuple(image_shape)
        self.embed_dim = embed_dim
        self.num_classes = n_classes  # the sister codebase's guided samplers read this name
        self.extras = 1 if n_classes == -1 else 2  # tokens before the patches
        self.patch_embed = PatchEmbed(patch_size, channels, embed_dim)
        if n_classes != -1:
            self.label_emb = LabelEmbedding(n_classes, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (height // patch_size) ** 2, embed_dim))
        half = depth // 2
        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(half))
        self.mid_block = Block(embed_dim, num_heads)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, skip) for _ in range(half))
        self.final = FinalLayer(embed_dim, patch_size, channels, final_conv)

        self.block_names = [f"in_{k}" for k in range(1, half + 1)] + ["mid"] + [f"out_{k}" for k in range(1, half + 1)]
        # --grid probes every block: on the demo data no block stood out (bench/README.md, "U-ViT"), and the
        # pass runs to the last out-block for the out-blocks anyway
        self.grid_blocks = list(self.block_names)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    @staticmethod
    def probe_defaults(network):
        """The probe cell of a config without one (the sister codebase's have no ``linear`` section): DDAE's
        DDPM timestep 11 and the mid block, the middle of the network (bench/README.md, "U-ViT")."""
        return {"timestep": 11, "blockname": "mid"}

    @staticmethod
    def check_settings(cfg, require):
        """Cross-key checks of the ``network`` section, at config load."""
        net = cfg.network
        require(len(net.image_shape) == 3 and net.image_shape[1] == net.image_shape[2], "network.image_shape",
                f"must be [C, H, H] (square images), got {net.image_shape}")
        for key in ("embed_dim", "patch_size", "depth", "num_heads"):
            require(net[key] >= 1, f"network.{key}", f"must be at least 1, got {net[key]}")
        require(net.image_shape[1] % net.patch_size == 0, "network.patch_size",
                f"must divide the image side {net.image_shape[1]}, got {net.patch_size}")
        require(net.embed_dim % net.num_heads == 0, "network.embed_dim",
                f"must be a multiple of network.num_heads ({net.num_heads}), got {net.embed_dim}")
        require(net.depth >= 2, "network.depth", f"must be at least 2 (one in-block and one out-block), "
                f"got {net.depth}")
        require(net.n_classes == -1 or net.n_classes >= 1, "network.n_classes",
                f"must be -1 (unconditional) or a class count, got {net.n_classes}")

    def _tokens(self, x, t, c, drop_mask):
        """(B, extras + T, D): [label token,] time token, patches, plus the position embedding."""
        patches = self.patch_embed(x)  # (B, T, D)
        batch = patches.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(batch) if t.numel() == 1 else t
        tokens = [timestep_embedding(t, self.embed_dim).to(patches.dtype)[:, None], patches]
        if self.num_classes != -1:
            if c is None:  # the null label, e.g. for features: docs/DESIGN.md, "Network contract"
                c = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
                drop_mask = None
            tokens.insert(0, self.label_emb(c, drop_mask).to(patches.dtype)[:, None])
        elif c is not None:
            raise ValueError("an unconditional UViT (n_classes -1) takes no labels c")
        return torch.cat(tokens, dim=1) + self.pos_embed

    def _run(self, x, t, c, drop_mask, wanted):
        """Run the network; ``wanted`` as BlockRecorder's. Returns (output or None, {name: patch tokens})."""
        recorder = BlockRecorder(self.block_names, wanted, self.grid_blocks)
        h = self._tokens(x, t, c, drop_mask)
        skips = []
        for block in self.in_blocks:
            skips.append(h := block(h))
            if recorder.keep(h[:, self.extras:]):
                return None, recorder.activations
        h = self.mid_block(h)
        if recorder.keep(h[:, self.extras:]):
            return None, recorder.activations
        for block in self.out_blocks:
            h = block(h, skips.pop())  # out_k takes in_{K+1-k}
            if recorder.keep(h[:, self.extras:]):
                return None, recorder.activations
        return self.final(h[:, self.extras:]), recorder.activations

    def forward(self, x, t, aug=None, ret_activation=False, c=None, drop_mask=None):
        """``x`` (B, C, H, W) noisy images in [-1, 1], ``t`` (B,) or one value: timestep / n_T. A conditional
        network takes ``c`` (B,) labels and ``drop_mask`` (B,), nonzero where the null label replaces the label
        (``c`` None: the null label for all). Returns the noise (B, C, H, W); with ``ret_activation`` also
        ``{block: (B, T, D)}`` for every block. ``aug`` stays None (the contract's place for EDM's augmentation
        labels)."""
        if aug is not None:
            raise ValueError("a UViT takes no augmentation labels")
        out, activations = self._run(x, t, c, drop_mask, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, aug=None, c=None, drop_mask=None):
        """Return ``{name: (B, T, D)}`` patch tokens for the requested blocks; later blocks are not run."""
        if aug is not None:
            raise ValueError("a UViT takes no augmentation labels")
        return self._run(x, t, c, drop_mask, names)[1]

    def stages(self, block):
        """The modules that compute ``block`` in running order, for finetune.py's layer decay: "embedding"
        (patch, position and label embeddings), then one stage per block up to ``block``."""
        embedding = [self.patch_embed, _Positions(self.pos_embed)]
        embedding += [self.label_emb] if self.num_classes != -1 else []
        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        return [("embedding", embedding)] + [(name, [module]) for name, module in
                                             zip(self.block_names[:self.block_names.index(block) + 1], blocks)]


class _Positions(nn.Module):
    """The network's ``pos_embed`` parameter as a module of ``stages`` (held in a list: not registered twice)."""

    def __init__(self, pos_embed):
        super().__init__()
        self.held = [pos_embed]

    def named_parameters(self, *args, **kwargs):
        yield "pos_embed", self.held[0]

    def parameters(self, *args, **kwargs):
        yield self.held[0]


class LabelEmbedding(nn.Module):
    """n_classes + 1 embeddings; the last, the null label, replaces ``c`` where ``drop_mask`` is nonzero."""

    def __init__(self, n_classes, dim):
        super().__init__()
        self.n_classes = n_classes
        self.embedding_table = nn.Embedding(n_classes + 1, dim)

    def forward(self, c, drop_mask=None):  # (B,) labels, (B,) mask or None -> (B, D)
        if drop_mask is not None:
            c = torch.where(torch.as_tensor(drop_mask, device=c.device) == 0, c, self.n_classes)
        return self.embedding_table(c)


def _init_weights(module):
    """The sister codebase's initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
