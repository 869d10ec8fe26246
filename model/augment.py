"""Geometric augmentation of the EDM paper (Karras et al. 2022, appendix), used by EDM_ddpmpp_aug.

    pipe = AugmentPipe(p=0.12)
    images, labels = pipe(images)  # (B, C, H, W) in any range, labels (B, 9)

Each image draws an x-flip, a y-flip, an isotropic scaling, a rotation, an anisotropic scaling and a
translation, each with probability ``p`` times its multiplier (the x-flip multiplier is so large that
every image flips with probability 1/2 as soon as p > 0). The flips are exact pixel copies; the other
four compose into one affine map per image, executed as one resampling of the reflect-padded image,
2x supersampled through the sym6 wavelet low-pass filter. Images without a geometric operation are
not resampled, so p = 0 is exactly the identity.

Conventions of the transformed content, in pixels with x to the right and y downwards, about the
image centre: it is first scaled by 2**log2_scale, then rotated counter-clockwise on screen by
``angle``, then stretched by 2**log2_aniso along the axis at ``aniso_angle`` (counter-clockwise
from +x) and by 2**-log2_aniso across it, and finally moved by (tx * W, ty * H).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError

# Symlet-6 scaling filter: the orthonormal low-pass decomposition filter "sym6" (Daubechies'
# least-asymmetric wavelet with 6 vanishing moments), as tabulated by PyWavelets' Wavelet('sym6').dec_lo.
SYM6_LOWPASS = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)

LABEL_NAMES = ("xflip", "yflip", "scale", "rotate_cos_minus_1", "rotate_sin",
               "aniso_cos", "aniso_sin", "translate_x", "translate_y")


@dataclass
class AugmentParams:
    """Per-image augmentation parameters, each zero (or False) where its operation is not applied.

    Attributes:
        xflip, yflip: (B,) bool, whether the image is mirrored left-right / top-bottom.
        log2_scale: (B,) log2 of the isotropic scale factor.
        angle: (B,) rotation in radians, counter-clockwise on screen.
        log2_aniso: (B,) log2 of the stretch along the anisotropy axis.
        aniso_angle: (B,) direction of that axis in radians, counter-clockwise from +x.
        translate: (B, 2) shift (x right, y down) as a fraction of the image width / height.
    """

    xflip: torch.Tensor
    yflip: torch.Tensor
    log2_scale: torch.Tensor
    angle: torch.Tensor
    log2_aniso: torch.Tensor
    aniso_angle: torch.Tensor
    translate: torch.Tensor

    def labels(self):
        """The network's conditioning, (B, 9), columns as in ``LABEL_NAMES``."""
        return torch.stack([
            self.xflip.float(), self.yflip.float(), self.log2_scale,
            torch.cos(self.angle) - 1, torch.sin(self.angle),
            self.log2_aniso * torch.cos(self.aniso_angle), self.log2_aniso * torch.sin(self.aniso_angle),
            self.translate[:, 0], self.translate[:, 1],
        ], dim=1)

    def is_geometric(self):
        """(B,) bool: whether the image needs resampling (any op other than the flips)."""
        return ((self.log2_scale != 0) | (self.angle != 0) | (self.log2_aniso != 0)
                | (self.translate != 0).any(dim=1))

    def inverse_affine(self, height, width):
        """(B, 2, 3) map from output to input pixel coordinates, both centred on the image."""
        linear = (_rotation(self.aniso_angle) @ _diagonal(2 ** -self.log2_aniso, 2 ** self.log2_aniso)
                  @ _rotation(-self.aniso_angle))
        linear = (2 ** -self.log2_scale)[:, None, None] * _rotation(-self.angle) @ linear  # (B, 2, 2)
        shift = self.translate * torch.tensor([width, height], dtype=self.translate.dtype,
                                              device=self.translate.device)
        offset = -(linear @ shift[:, :, None])  # (B, 2, 1)
        return torch.cat([linear, offset], dim=2)


def _rotation(angle):
    """(B, 2, 2) counter-clockwise rotation on screen, i.e. in coordinates whose y axis points down."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, sin], dim=1), torch.stack([-sin, cos], dim=1)], dim=1)


def _diagonal(x_factor, y_factor):
    """(B, 2, 2) axis-aligned scaling."""
    zeros = torch.zeros_like(x_factor)
    return torch.stack([torch.stack([x_factor, zeros], dim=1), torch.stack([zeros, y_factor], dim=1)], dim=1)


def _reflect_indices(size, margin, device):
    """Indices that reflect-pad an axis of ``size`` by ``margin`` on both sides (edge not repeated),
    folding again for margins wider than the axis."""
    index = torch.arange(-margin, size + margin, device=device).remainder(2 * (size - 1))
    return torch.where(index >= size, 2 * (size - 1) - index, index)


class AugmentPipe(nn.Module):
    """EDM's geometric augmentation with its 9 conditioning labels.

    Args:
        p: augmentation probability (config key ``diffusion.augment_prob``; DDAE uses 0.12).
        xflip, yflip, scale, rotate, aniso, translate: per-operation multipliers of ``p`` (0 turns
            an operation off). The x-flip's 1e8 makes every image flip with probability 1/2 when p > 0.
        scale_std: standard deviation of log2 of the isotropic scale factor.
        aniso_std: standard deviation of log2 of the anisotropic stretch.
        aniso_rotate_prob: probability that the anisotropy axis is a random direction instead of x.
        translate_std: standard deviation of the shift, as a fraction of the image size.

    ``forward(images, generator=None)`` returns ``(augmented, labels)``; ``sample_params`` and
    ``apply`` split it into the random draw and the deterministic transformation. The parameters are
    drawn on the generator's device (the CPU without one) so that choosing what to resample needs no
    GPU synchronisation. No gradients flow through the pipe. Images need H, W >= 2.
    """

    def __init__(self, p=0.12, xflip=1e8, yflip=1, scale=1, rotate=1, aniso=1, translate=1,
                 scale_std=0.2, aniso_std=0.2, aniso_rotate_prob=0.5, translate_std=0.125):
        super().__init__()
        if not 0 <= p <= 1:
            raise UserError(f"augment_prob (AugmentPipe p) is {p}; set it to a probability in [0, 1]")
        multipliers = dict(xflip=xflip, yflip=yflip, scale=scale, rotate=rotate, aniso=aniso,
                           translate=translate)
        negative = [name for name, value in multipliers.items() if value < 0]
        if negative:
            raise UserError(f"AugmentPipe multiplier(s) {negative} are negative; use 0 to turn an operation off")
        self.p = p
        self.xflip, self.yflip, self.scale, self.rotate = xflip, yflip, scale, rotate
        self.aniso, self.translate = aniso, translate
        self.scale_std, self.aniso_std, self.translate_std = scale_std, aniso_std, translate_std
        self.aniso_rotate_prob = aniso_rotate_prob
        lowpass = torch.tensor(SYM6_LOWPASS, dtype=torch.float64)
        lowpass = lowpass / lowpass.sum()
        self.register_buffer("lowpass", lowpass.float(), persistent=False)
        # The filter's centroid is its delay: a supersampled pixel n stands for image coordinate (n - delay) / 2.
        self.filter_delay = float((torch.arange(len(SYM6_LOWPASS)) * lowpass).sum())

    def forward(self, images, generator=None):
        """Augment a batch.

        Args:
            images: (B, C, H, W) in any range.
            generator: optional ``torch.Generator`` for reproducible draws.

        Returns:
            (augmented images (B, C, H, W) in the input's dtype, labels (B, 9) float32 on its device).
        """
        params = self.sample_params(images.shape[0], generator)
        return self.apply(images, params), params.labels().to(images.device)

    def sample_params(self, batch_size, generator=None):
        """Draw the parameters of ``batch_size`` images; every draw is made whatever the outcome."""
        device = generator.device if generator is not None else torch.device("cpu")

        def uniform(*shape):
            return torch.rand(shape, generator=generator, device=device)

        def normal(*shape):
            return torch.randn(shape, generator=generator, device=device)

        def chosen(multiplier):
            return uniform(batch_size) < self.p * multiplier

        def where(mask, value):
            return torch.where(mask, value, torch.zeros_like(value))

        xflip = chosen(self.xflip) & (uniform(batch_size) < 0.5)
        yflip = chosen(self.yflip) & (uniform(batch_size) < 0.5)
        log2_scale = where(chosen(self.scale), normal(batch_size) * self.scale_std)
        angle = where(chosen(self.rotate), (uniform(batch_size) * 2 - 1) * math.pi)
        aniso_on = chosen(self.aniso)
        log2_aniso = where(aniso_on, normal(batch_size) * self.aniso_std)
        axis_on = aniso_on & (uniform(batch_size) < self.aniso_rotate_prob)
        aniso_angle = where(axis_on, (uniform(batch_size) * 2 - 1) * math.pi)
        translate = where(chosen(self.translate)[:, None], normal(batch_size, 2) * self.translate_std)
        return AugmentParams(xflip, yflip, log2_scale, angle, log2_aniso, aniso_angle, translate)

    @torch.no_grad()
    def apply(self, images, params):
        """Transform ``images`` (B, C, H, W) as ``params`` say; images without an operation are untouched."""
        device = images.device
        images = torch.where(params.xflip.to(device)[:, None, None, None], images.flip(3), images)
        images = torch.where(params.yflip.to(device)[:, None, None, None], images.flip(2), images)
        geometric = params.is_geometric()
        if not geometric.any():
            return images
        selected = geometric.nonzero()[:, 0]  # on the parameters' device
        inverse = params.inverse_affine(images.shape[2], images.shape[3])[selected].float()
        selected = selected.to(device)
        resampled = self._resample(images[selected].float(), inverse)
        return images.index_copy(0, selected, resampled.to(images.dtype))

    def _resample(self, images, inverse):
        """Resample (N, C, H, W) float32 images through ``inverse`` (N, 2, 3): reflect-pad, upsample
        2x with the low-pass filter, sample bilinearly, filter and downsample 2x.

        The up- and downsampling use the same orthonormal filter (a convolution, then a correlation),
        so together they are exactly the identity.
        """
        n_images, channels, height, width = images.shape
        taps = self.lowpass.numel()
        lowpass = self.lowpass.to(images.device)
        centroid = self.filter_delay
        centre = torch.tensor([(width - 1) / 2, (height - 1) / 2])

        # Output supersampled grid: the taps needed to filter-downsample it to H x W.
        grid_size = torch.tensor([2 * width + taps - 2, 2 * height + taps - 2])
        half_extent = torch.maximum(torch.tensor(centroid), taps - 1 - torch.tensor(centroid)) / 2 + centre
        corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * half_extent  # (4, 2)
        inverse_cpu = inverse.cpu()
        reach = (corners @ inverse_cpu[:, :, :2].transpose(1, 2) + inverse_cpu[:, None, :, 2]).abs()  # (N, 4, 2)
        excess = (reach.amax(dim=(0, 1)) - centre).clamp(min=0)
        # Room for the upsampling filter's support and the bilinear neighbour beyond the reach.
        margin_x, margin_y = (math.ceil(value) + taps // 2 for value in excess.tolist())

        padded = images.index_select(3, _reflect_indices(width, margin_x, images.device))
        padded = padded.index_select(2, _reflect_indices(height, margin_y, images.device))
        up = padded.reshape(n_images * channels, 1, *padded.shape[2:])
        up = F.conv_transpose2d(up, 2 * lowpass.view(1, 1, 1, taps), stride=(1, 2))
        up = F.conv_transpose2d(up, 2 * lowpass.view(1, 1, taps, 1), stride=(2, 1))
        up = up.reshape(n_images, channels, *up.shape[2:])  # (N, C, 2(H + 2my) + taps - 2, ...)

        out_x = (torch.arange(int(grid_size[0]), device=images.device) - centroid) / 2 - centre[0].item()
        out_y = (torch.arange(int(grid_size[1]), device=images.device) - centroid) / 2 - centre[1].item()
        out_y, out_x = torch.meshgrid(out_y, out_x, indexing="ij")
        out_xy = torch.stack([out_x, out_y], dim=-1).reshape(1, -1, 2)  # (1, Hs * Ws, 2)
        inverse = inverse.to(images.device)
        in_xy = out_xy @ inverse[:, :, :2].transpose(1, 2) + inverse[:, None, :, 2]  # (N, Hs * Ws, 2)
        margins = torch.tensor([margin_x, margin_y], device=images.device)
        up_index = 2 * (in_xy + centre.to(images.device) + margins) + centroid
        up_size = torch.tensor([up.shape[3], up.shape[2]], device=images.device)
        grid = (2 * up_index / (up_size - 1) - 1).reshape(n_images, int(grid_size[1]), int(grid_size[0]), 2)
        sampled = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

        down = sampled.reshape(n_images * channels, 1, *sampled.shape[2:])
        down = F.conv2d(down, lowpass.view(1, 1, 1, taps), stride=(1, 2))
        down = F.conv2d(down, lowpass.view(1, 1, taps, 1), stride=(2, 1))
        return down.reshape(n_images, channels, height, width)
