"""Geometric augmentation of the EDM paper (Karras et al. 2022, appendix), used by EDM_ddpmpp_aug.

    pipe = AugmentPipe(p=0.12)
    images, labels = pipe(images)  # (B, C, H, W) in any range, labels (B, 9)

Each image draws an x-flip, a y-flip, an isotropic scaling, a rotation, an anisotropic scaling and a
translation, each with probability ``p`` times its multiplier (the x-flip multiplier is so large that
every image flips with probability 1/2 as soon as p > 0). The flips are exact pixel copies; the other
four compose into one affine map per image, executed as the original does it (SPEC §4): reflect-pad
by a margin shared by the batch, upsample 2x with the sym6 wavelet filter, sample bilinearly,
filter and downsample 2x. Images without a geometric operation are not resampled, so p = 0 is
exactly the identity.

The content is transformed about the image centre (x right, y down): scaled, rotated, stretched along the
anisotropy axis and by the inverse across it, then moved; ``AugmentParams`` gives each amount.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.amp import autocast_off
from utils.errors import UserError

# Symlet-6 scaling filter: the orthonormal low-pass decomposition filter "sym6" (Daubechies'
# least-asymmetric wavelet with 6 vanishing moments), as tabulated by PyWavelets' Wavelet('sym6').dec_lo.
SYM6_LOWPASS = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
FILTER_PAD = len(SYM6_LOWPASS) // 4  # output pixels kept beyond each side for the downsampling filter

LABEL_NAMES = ("xflip", "yflip", "scale_w", "rotate_cos_minus_1", "rotate_sin",
               "aniso_w_cos", "aniso_w_sin", "translate_w_x", "translate_w_y")


@dataclass
class AugmentParams:
    """Per-image augmentation draws, each zero (or False) where its operation is not applied.

    Attributes:
        xflip, yflip: (B,) bool, whether the image is mirrored left-right / top-bottom.
        scale_w: (B,) N(0,1) draw; the content is scaled by 2**(scale_std * scale_w).
        angle: (B,) rotation in radians, counter-clockwise on screen.
        aniso_w: (B,) N(0,1) draw; the stretch along the anisotropy axis is 2**(aniso_std * aniso_w).
        aniso_angle: (B,) direction of that axis in radians, counter-clockwise from +x.
        translate_w: (B, 2) N(0,1) draws; the shift (x right, y down) is translate_std * (W, H) * translate_w.
        scale_std, aniso_std, translate_std: the standard deviations that turn the draws into amounts.
    """

    xflip: torch.Tensor
    yflip: torch.Tensor
    scale_w: torch.Tensor
    angle: torch.Tensor
    aniso_w: torch.Tensor
    aniso_angle: torch.Tensor
    translate_w: torch.Tensor
    scale_std: float = 0.2
    aniso_std: float = 0.2
    translate_std: float = 0.125

    def labels(self):
        """The network's conditioning, (B, 9), columns as in ``LABEL_NAMES``: the raw draws, as the original."""
        return torch.stack([
            self.xflip.float(), self.yflip.float(), self.scale_w,
            torch.cos(self.angle) - 1, torch.sin(self.angle),
            self.aniso_w * torch.cos(self.aniso_angle), self.aniso_w * torch.sin(self.aniso_angle),
            self.translate_w[:, 0], self.translate_w[:, 1],
        ], dim=1)

    def is_geometric(self):
        """(B,) bool: whether the image needs resampling (any op other than the flips)."""
        return ((self.scale_w != 0) | (self.angle != 0) | (self.aniso_w != 0)
                | (self.translate_w != 0).any(dim=1))

    def inverse_affine(self, height, width):
        """(B, 2, 3) map from output to input pixel coordinates, both centred on the image."""
        log2_aniso = self.aniso_w * self.aniso_std
        linear = (_rotation(self.aniso_angle) @ _diagonal(2 ** -log2_aniso, 2 ** log2_aniso)
                  @ _rotation(-self.aniso_angle))
        linear = (2 ** -(self.scale_w * self.scale_std))[:, None, None] * _rotation(-self.angle) @ linear
        size = torch.tensor([width, height], dtype=self.translate_w.dtype, device=self.translate_w.device)
        shift = self.translate_w * self.translate_std * size
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


def _upload(tensors, device, one_copy=None):
    """The CPU ``tensors`` on ``device``. To a GPU (``one_copy``, by default on CUDA) they travel as one
    asynchronous copy, from pinned memory on CUDA: a plain copy from pageable memory would wait for the
    GPU's queued work. Tensors already off the CPU are moved one by one."""
    if one_copy is None:
        one_copy = device.type == "cuda"
    if not one_copy or any(tensor.device.type != "cpu" for tensor in tensors):
        return [tensor.to(device) for tensor in tensors]
    packed = torch.cat([tensor.reshape(-1).float() for tensor in tensors])  # bools, indices < 2**24: exact
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    pieces = packed.split([tensor.numel() for tensor in tensors])
    return [piece.view(tensor.shape).to(tensor.dtype) for piece, tensor in zip(pieces, tensors)]


def batch_margins(inverse, height, width):
    """Reflect-padding (left, top, right, bottom) of a batch, as ints: how far the inverse maps
    (B, 2, 3) reach beyond the image from its output corners, plus the filters' support, clipped to
    the image size (grid_sample's zero padding applies beyond)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy], [cx, -cy], [cx, cy], [-cx, cy]], dtype=inverse.dtype,
                           device=inverse.device)
    reach = corners @ inverse[:, :, :2].transpose(1, 2) + inverse[:, None, :, 2]  # (B, 4, 2)
    reach = torch.cat([-reach, reach], dim=2).amax(dim=(0, 1))  # (4,): -x, -y, +x, +y
    centre = torch.tensor([cx, cy, cx, cy], dtype=inverse.dtype, device=inverse.device)
    limit = torch.tensor([width - 1, height - 1] * 2, dtype=inverse.dtype, device=inverse.device)
    margin = (reach + 2 * FILTER_PAD - centre).clamp(min=0).minimum(limit).ceil()
    return tuple(int(value) for value in margin.tolist())


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

    Calls: docs/DESIGN.md, Augmentation contract. The parameters are drawn on the generator's device (the CPU
    without one), so that choosing what to resample and the padding margin need no GPU synchronisation.
    No gradients flow through the pipe. Images need H, W >= 2.
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
        self.register_buffer("lowpass", torch.tensor(SYM6_LOWPASS), persistent=False)

    def forward(self, images, generator=None):
        """Augment a batch.

        Args:
            images: (B, C, H, W) in any range.
            generator: optional ``torch.Generator`` for reproducible draws.

        Returns:
            (augmented images (B, C, H, W) in the input's dtype, labels (B, 9) float32 on its device).
        """
        params = self.sample_params(images.shape[0], generator)
        return self._transform(images, params, params.labels())

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
        scale_w = where(chosen(self.scale), normal(batch_size))
        angle = where(chosen(self.rotate), (uniform(batch_size) * 2 - 1) * math.pi)
        aniso_on = chosen(self.aniso)
        aniso_w = where(aniso_on, normal(batch_size))
        axis_on = aniso_on & (uniform(batch_size) < self.aniso_rotate_prob)
        aniso_angle = where(axis_on, (uniform(batch_size) * 2 - 1) * math.pi)
        translate_w = where(chosen(self.translate)[:, None], normal(batch_size, 2))
        return AugmentParams(xflip, yflip, scale_w, angle, aniso_w, aniso_angle, translate_w,
                             self.scale_std, self.aniso_std, self.translate_std)

    def apply(self, images, params):
        """Transform ``images`` (B, C, H, W) as ``params`` say; images without an operation are untouched."""
        return self._transform(images, params)[0]

    def _transform(self, images, params, labels=None):
        """``apply``, plus ``labels`` moved to the images' device in the same copy. An enclosing autocast
        is turned off: the resampling runs in float32 whatever precision the caller's network uses."""
        with torch.no_grad(), autocast_off(images.device):
            return self._transform_float32(images, params, labels)

    def _transform_float32(self, images, params, labels):
        height, width = images.shape[2:]
        geometric = params.is_geometric()
        selected = geometric.nonzero()[:, 0]  # on the parameters' device, like everything decided here
        theta = torch.zeros(0, 2, 3)
        if len(selected):
            inverse = params.inverse_affine(height, width).float()
            # The margin is the batch's, the untouched images' identity maps included, as in the original.
            margins = batch_margins(inverse, height, width)
            theta = self._sampling_theta(inverse[selected], margins, height, width)
        on_cpu = [params.xflip, params.yflip, selected, theta] + ([] if labels is None else [labels])
        xflip, yflip, selected, theta, *labels = _upload(on_cpu, images.device)
        images = torch.where(xflip[:, None, None, None], images.flip(3), images)
        images = torch.where(yflip[:, None, None, None], images.flip(2), images)
        if len(selected):
            resampled = self._resample(images[selected].float(), theta, margins)
            images = images.index_copy(0, selected, resampled.to(images.dtype))
        return images, (labels[0] if labels else None)

    @staticmethod
    def _sampling_theta(inverse, margins, height, width):
        """affine_grid's (N, 2, 3) theta: ``inverse`` moved onto the padded, 2x upsampled input and the
        2x supersampled output with its FILTER_PAD border, in align_corners=False coordinates."""
        left, top, right, bottom = margins
        linear, offset = inverse[:, :, :2], inverse[:, :, 2]
        # Centred on the padded image, then on the 2x grids, whose pixel centres sit half a
        # supersampled pixel from the original ones (the original's convention).
        offset = offset + torch.tensor([(left - right) / 2, (top - bottom) / 2], dtype=offset.dtype,
                                       device=offset.device)
        offset = 2 * offset + 0.5 * linear.sum(dim=2) - 0.5
        in_half = torch.tensor([width + left + right, height + top + bottom], dtype=offset.dtype,
                               device=offset.device)  # half the upsampled input's size
        out_half = torch.tensor([width + 2 * FILTER_PAD, height + 2 * FILTER_PAD], dtype=offset.dtype,
                                device=offset.device)
        linear = linear * out_half[None, None, :] / in_half[None, :, None]
        offset = offset / in_half
        return torch.cat([linear, offset[:, :, None]], dim=2)

    def _resample(self, images, theta, margins):
        """Resample (N, C, H, W) float32 images with affine_grid's ``theta`` (N, 2, 3) after a reflect
        padding by ``margins`` (left, top, right, bottom).

        cuDNN's autotuning (``--cudnn_benchmark``) is off here: the convolutions' shapes follow the
        number of augmented images and the batch's margins, so nearly every step brings a new one
        (1,197 distinct shapes in 2,000 draws of 64 images at p = 0.12, a new one in every other step
        after the first 1,000), and each would be timed afresh; these single-channel filters gain nothing.
        """
        autotune = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            return self._resample_fixed_algorithms(images, theta, margins)
        finally:
            torch.backends.cudnn.benchmark = autotune

    def _resample_fixed_algorithms(self, images, theta, margins):
        n_images, channels, height, width = images.shape
        taps = self.lowpass.numel()
        lowpass = self.lowpass.to(device=images.device, dtype=images.dtype)
        row, column = lowpass.view(1, 1, 1, taps), lowpass.view(1, 1, taps, 1)
        left, top, right, bottom = margins
        padded = F.pad(images, (left, right, top, bottom), mode="reflect")

        # 2x upsampling: zeros between the samples, then a convolution with the filter (a correlation
        # with the reversed filter, padding taps // 2) is a transposed convolution of stride 2.
        up = padded.reshape(n_images * channels, 1, *padded.shape[2:])
        up = F.conv_transpose2d(up, row, stride=(1, 2), padding=(0, taps // 2 - 1))
        up = F.conv_transpose2d(up, column, stride=(2, 1), padding=(taps // 2 - 1, 0))
        up = up.reshape(n_images, channels, *up.shape[2:])  # (N, C, 2 (H + top + bottom), 2 (W + left + right))

        size = (n_images, channels, 2 * (height + 2 * FILTER_PAD), 2 * (width + 2 * FILTER_PAD))
        grid = F.affine_grid(theta, size, align_corners=False)
        sampled = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # Stride-2 correlation with the filter, then the FILTER_PAD border is cropped.
        down = sampled.reshape(n_images * channels, 1, *sampled.shape[2:])
        down = F.conv2d(down, row, stride=(1, 2), padding=(0, (taps - 1) // 2))
        down = F.conv2d(down, column, stride=(2, 1), padding=((taps - 1) // 2, 0))
        down = down[:, :, FILTER_PAD:-FILTER_PAD, FILTER_PAD:-FILTER_PAD]
        return down.reshape(n_images, channels, height, width)
