"""EDM's geometric augmentation: exact identities, label layout and the direction of every operation."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.augment import SYM6_LOWPASS, AugmentParams, AugmentPipe
from utils.errors import UserError

SIZE = 32
CENTRE = (SIZE - 1) / 2
ALL_OFF = dict(xflip=0, yflip=0, scale=0, rotate=0, aniso=0, translate=0)
LABEL_COLUMNS = dict(xflip=[0], yflip=[1], scale=[2], rotate=[3, 4], aniso=[5, 6], translate=[7, 8])


def random_images(batch=8, seed=0):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def fixed_params(batch=1, **values):
    """Parameters with every operation off except the given ones (plain floats or tensors)."""
    zeros = torch.zeros(batch)
    params = dict(xflip=zeros.bool(), yflip=zeros.bool(), log2_scale=zeros, angle=zeros,
                  log2_aniso=zeros, aniso_angle=zeros, translate=torch.zeros(batch, 2))
    for name, value in values.items():
        params[name] = torch.as_tensor(value, dtype=torch.float32).expand_as(params[name]).clone()
    return AugmentParams(**params)


def coordinates():
    """(x, y) pixel coordinates of a SIZE x SIZE image, each (SIZE, SIZE)."""
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    return x, y


def interior(images, border=6):
    """Drop the border that the reflect padding reaches."""
    return images[..., border:-border, border:-border]


def test_sym6_filter_is_orthonormal_with_six_vanishing_moments():
    lowpass = torch.tensor(SYM6_LOWPASS, dtype=torch.float64)
    assert len(SYM6_LOWPASS) == 12
    torch.testing.assert_close(lowpass.sum(), torch.tensor(math.sqrt(2), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    for shift in range(6):
        expected = 1.0 if shift == 0 else 0.0
        assert abs(float((lowpass[:12 - 2 * shift] * lowpass[2 * shift:]).sum()) - expected) < 1e-11
    taps = torch.arange(12, dtype=torch.float64)
    alternating = (-1.0) ** taps
    for order in range(6):
        assert abs(float((alternating * taps ** order * lowpass).sum())) < 1e-9 * 11 ** order


def test_p0_is_exact_identity_with_zero_labels():
    images = random_images()
    out, labels = AugmentPipe(p=0)(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, images)
    assert labels.shape == (8, 9) and labels.dtype == torch.float32
    assert torch.equal(labels, torch.zeros(8, 9))


def test_labels_at_p1_have_the_documented_layout():
    pipe = AugmentPipe(p=1)
    out, labels = pipe(random_images(), generator=torch.Generator().manual_seed(3))
    params = pipe.sample_params(8, generator=torch.Generator().manual_seed(3))
    assert out.shape == (8, 3, SIZE, SIZE) and labels.shape == (8, 9)
    assert torch.equal(labels, params.labels())
    # At p = 1 every geometric operation is applied to every image.
    assert (labels[:, [2, 3, 4, 5, 7, 8]] != 0).all()
    assert torch.equal(labels[:, 0], params.xflip.float())
    assert torch.equal(labels[:, 1], params.yflip.float())
    assert torch.equal(labels[:, 6] == 0, params.aniso_angle == 0)
    torch.testing.assert_close(labels[:, 2], params.log2_scale)
    torch.testing.assert_close(labels[:, 3] + 1, torch.cos(params.angle))
    torch.testing.assert_close(labels[:, 7:], params.translate)


@pytest.mark.parametrize("operation", list(LABEL_COLUMNS))
def test_label_columns_are_zero_exactly_where_the_image_was_left_alone(operation):
    # Only this operation, with probability 1/2 (the flips are always considered, then flip half the time).
    multipliers = dict(ALL_OFF, **{operation: 1 if operation.endswith("flip") else 0.5})
    images = random_images(batch=16)
    out, labels = AugmentPipe(p=1, **multipliers)(images, generator=torch.Generator().manual_seed(4))
    own = LABEL_COLUMNS[operation]
    others = [column for column in range(9) if column not in own]
    assert torch.equal(labels[:, others], torch.zeros(16, len(others)))
    changed = torch.tensor([not torch.equal(a, b) for a, b in zip(out, images)])
    labelled = (labels[:, own] != 0).any(dim=1)
    assert torch.equal(changed, labelled)
    assert changed.any() and not changed.all()


@pytest.mark.parametrize("operation, dim, column", [("xflip", 3, 0), ("yflip", 2, 1)])
def test_flip_alone_mirrors_exactly(operation, dim, column):
    images = random_images()
    pipe = AugmentPipe(p=1, **dict(ALL_OFF, **{operation: 1}))
    out, labels = pipe(images, generator=torch.Generator().manual_seed(5))
    flipped = labels[:, column] == 1
    assert torch.equal(labels[:, column], flipped.float())
    assert flipped.any() and not flipped.all()
    assert torch.equal(out[flipped], images[flipped].flip(dim))
    assert torch.equal(out[~flipped], images[~flipped])


def test_x_flip_probability_is_one_half_whenever_p_is_positive():
    labels = AugmentPipe(p=0.01)(torch.zeros(4000, 1, 2, 2), generator=torch.Generator().manual_seed(6))[1]
    assert abs(float(labels[:, 0].mean()) - 0.5) < 0.03
    assert abs(float((labels[:, 1:] != 0).any(dim=1).float().mean()) - (1 - 0.99 ** 5)) < 0.02


def test_integer_translation_moves_the_content_by_whole_pixels():
    images = random_images()
    # 3 pixels to the right, 2 pixels up.
    out = AugmentPipe().apply(images, fixed_params(8, translate=[3 / SIZE, -2 / SIZE]))
    torch.testing.assert_close(out[..., :-2, 3:], images[..., 2:, :-3], rtol=0, atol=1e-4)
    # What enters at the borders is the reflection of the image (edge pixel not repeated).
    reflected = F.pad(images, (3, 0, 0, 2), mode="reflect")
    torch.testing.assert_close(out, reflected[..., 2:, :SIZE], rtol=0, atol=1e-4)


def test_quarter_turn_is_counter_clockwise_on_screen():
    x, y = coordinates()
    ramp = (x + 2 * y)[None, None]
    smooth = (torch.sin(x / 4) + torch.cos(y / 5))[None, None]
    pipe = AugmentPipe()
    quarter_turn = fixed_params(angle=math.pi / 2)
    # Exact for linear content; the slightly asymmetric sym6 filter blurs finer content a little.
    torch.testing.assert_close(interior(pipe.apply(ramp, quarter_turn)),
                               interior(torch.rot90(ramp, 1, dims=(2, 3))), rtol=0, atol=1e-4)
    torch.testing.assert_close(interior(pipe.apply(smooth, quarter_turn)),
                               interior(torch.rot90(smooth, 1, dims=(2, 3))), rtol=0, atol=5e-3)


@pytest.mark.parametrize("values, expected_x_factor, expected_y_factor", [
    (dict(log2_scale=1.0), 0.5, 0.5),                              # content magnified 2x
    (dict(log2_scale=-1.0), 2.0, 2.0),                             # content shrunk 2x
    (dict(log2_aniso=1.0), 0.5, 2.0),                              # stretched along x, squeezed along y
    (dict(log2_aniso=1.0, aniso_angle=math.pi / 2), 2.0, 0.5),     # stretched along y
])
def test_scalings_act_about_the_centre(values, expected_x_factor, expected_y_factor):
    """On a ramp a x + b y, out(q) = in(S^-1 q) about the centre, which is again a ramp."""
    x, y = coordinates()
    ramp = (x + 2 * y)[None, None]
    expected = (CENTRE + (x - CENTRE) * expected_x_factor) + 2 * (CENTRE + (y - CENTRE) * expected_y_factor)
    out = AugmentPipe().apply(ramp, fixed_params(**values))
    # A 2x shrink reads input out to twice the distance from the centre, so only the middle stays
    # clear of the reflected border.
    torch.testing.assert_close(interior(out, border=12), interior(expected[None, None], border=12),
                               rtol=0, atol=1e-4)


def test_fractional_translation_shifts_a_ramp():
    x, y = coordinates()
    ramp = (x + 2 * y)[None, None]
    out = AugmentPipe().apply(ramp, fixed_params(translate=[0.3 / SIZE, 0.7 / SIZE]))
    torch.testing.assert_close(interior(out), interior(ramp - 0.3 - 2 * 0.7), rtol=0, atol=1e-4)


def test_labels_encode_the_parameters():
    params = fixed_params(4, log2_scale=0.25, angle=math.pi / 2, log2_aniso=0.5, aniso_angle=math.pi / 2,
                          translate=[0.1, -0.2])
    params.xflip[1] = True
    params.yflip[2] = True
    expected = torch.tensor([0.0, 0.0, 0.25, -1.0, 1.0, 0.0, 0.5, 0.1, -0.2]).repeat(4, 1)
    expected[1, 0] = 1
    expected[2, 1] = 1
    torch.testing.assert_close(params.labels(), expected, rtol=0, atol=1e-6)


def test_random_batch_at_p1_stays_finite_and_reproducible():
    images = random_images()
    pipe = AugmentPipe(p=1)
    out, labels = pipe(images, generator=torch.Generator().manual_seed(7))
    again, labels_again = pipe(images, generator=torch.Generator().manual_seed(7))
    other, _ = pipe(images, generator=torch.Generator().manual_seed(8))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.isfinite(out).all() and torch.isfinite(labels).all()
    assert torch.equal(out, again) and torch.equal(labels, labels_again)
    assert not torch.equal(out, other)


def test_pipe_adds_nothing_to_a_state_dict():
    assert AugmentPipe().state_dict() == {}


@pytest.mark.parametrize("kwargs, word", [(dict(p=1.5), "augment_prob"), (dict(rotate=-1), "rotate")])
def test_bad_settings_raise_user_error(kwargs, word):
    with pytest.raises(UserError, match=word):
        AugmentPipe(**kwargs)
