"""EDM's geometric augmentation: parity with the original (golden), exact identities, label layout and the
direction of every operation."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import augment
from model.augment import SYM6_LOWPASS, AugmentParams, AugmentPipe, batch_margins
from utils.errors import UserError

GOLDEN = Path(__file__).resolve().parent / "golden" / "augment.pt"
SIZE = 32
CENTRE = (SIZE - 1) / 2
# The original's half-pixel convention on the 2x grids, with sym6's delay (its centroid is 5.098
# taps, not 5.5), makes the linear part act about a point this far up and left of the centre.
_TAPS = torch.tensor(SYM6_LOWPASS, dtype=torch.float64)
PIVOT = CENTRE - (float((torch.arange(12) * _TAPS).sum() / _TAPS.sum()) - 5) / 2
ALL_OFF = dict(xflip=0, yflip=0, scale=0, rotate=0, aniso=0, translate=0)
LABEL_COLUMNS = dict(xflip=[0], yflip=[1], scale=[2], rotate=[3, 4], aniso=[5, 6], translate=[7, 8])


def random_images(batch=8, seed=0):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def fixed_params(batch=1, **values):
    """Parameters with every operation off except the given ones (plain floats or tensors). The stds
    are 1, so scale_w and aniso_w are log2 factors and translate_w a fraction of the image size."""
    zeros = torch.zeros(batch)
    params = dict(xflip=zeros.bool(), yflip=zeros.bool(), scale_w=zeros, angle=zeros,
                  aniso_w=zeros, aniso_angle=zeros, translate_w=torch.zeros(batch, 2))
    for name, value in values.items():
        params[name] = torch.as_tensor(value, dtype=torch.float32).expand_as(params[name]).clone()
    return AugmentParams(**params, scale_std=1.0, aniso_std=1.0, translate_std=1.0)


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
    torch.testing.assert_close(labels[:, 2], params.scale_w)
    torch.testing.assert_close(labels[:, 3] + 1, torch.cos(params.angle))
    torch.testing.assert_close(labels[:, 7:], params.translate_w)


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
    out = AugmentPipe().apply(images, fixed_params(8, translate_w=[3 / SIZE, -2 / SIZE]))
    torch.testing.assert_close(out[..., :-2, 3:], images[..., 2:, :-3], rtol=0, atol=1e-4)
    # What enters at the borders is the reflection of the image (edge pixel not repeated).
    reflected = F.pad(images, (3, 0, 0, 2), mode="reflect")
    torch.testing.assert_close(out, reflected[..., 2:, :SIZE], rtol=0, atol=1e-4)


def test_quarter_turn_is_counter_clockwise_on_screen():
    x, y = coordinates()
    pipe = AugmentPipe()
    quarter_turn = fixed_params(angle=math.pi / 2)
    # Counter-clockwise on screen (y down): output pixel (x, y) shows input (-y, x) about the pivot,
    # as torch.rot90(image, 1, dims=(2, 3)) does about the centre.
    read_x, read_y = PIVOT - (y - PIVOT), PIVOT + (x - PIVOT)
    for function, atol in [(lambda u, v: u + 2 * v, 1e-4),  # exact for linear content
                           (lambda u, v: torch.sin(u / 4) + torch.cos(v / 5), 5e-3)]:  # sym6 blurs a little
        out = pipe.apply(function(x, y)[None, None], quarter_turn)
        torch.testing.assert_close(interior(out), interior(function(read_x, read_y)[None, None]),
                                   rtol=0, atol=atol)
    ramp = (x + 2 * y)[None, None]
    # The pivot is the original's: a turn about the centre would differ by more than 0.05 here.
    assert (interior(pipe.apply(ramp, quarter_turn)) - interior(torch.rot90(ramp, 1, dims=(2, 3)))).abs().max() > 0.05


@pytest.mark.parametrize("values, expected_x_factor, expected_y_factor", [
    (dict(scale_w=1.0), 0.5, 0.5),                              # content magnified 2x
    (dict(scale_w=-1.0), 2.0, 2.0),                             # content shrunk 2x
    (dict(aniso_w=1.0), 0.5, 2.0),                              # stretched along x, squeezed along y
    (dict(aniso_w=1.0, aniso_angle=math.pi / 2), 2.0, 0.5),     # stretched along y
])
def test_scalings_act_about_the_pivot(values, expected_x_factor, expected_y_factor):
    """On a ramp a x + b y, out(q) = in(S^-1 q) about the pivot, which is again a ramp."""
    x, y = coordinates()
    ramp = (x + 2 * y)[None, None]
    expected = (PIVOT + (x - PIVOT) * expected_x_factor) + 2 * (PIVOT + (y - PIVOT) * expected_y_factor)
    out = AugmentPipe().apply(ramp, fixed_params(**values))
    # A 2x shrink reads input out to twice the distance from the centre, so only the middle stays
    # clear of the reflected border.
    torch.testing.assert_close(interior(out, border=12), interior(expected[None, None], border=12),
                               rtol=0, atol=1e-4)


def test_fractional_translation_shifts_a_ramp():
    x, y = coordinates()
    ramp = (x + 2 * y)[None, None]
    out = AugmentPipe().apply(ramp, fixed_params(translate_w=[0.3 / SIZE, 0.7 / SIZE]))
    torch.testing.assert_close(interior(out), interior(ramp - 0.3 - 2 * 0.7), rtol=0, atol=1e-4)


def golden_params(golden):
    """The original's recorded draws as our parameters."""
    draws, std = golden["draws"], golden["std"]
    return AugmentParams(draws["xflip"].bool(), draws["yflip"].bool(), draws["scale_w"], draws["angle"],
                         draws["aniso_w"], draws["aniso_r"], draws["translate_w"].t().contiguous(),
                         scale_std=std["scale_std"], aniso_std=std["aniso_std"],
                         translate_std=std["translate_frac_std"])


def test_golden_labels_are_the_originals_raw_draws():
    golden = torch.load(GOLDEN, weights_only=True)
    assert torch.equal(golden_params(golden).labels(), golden["labels"])


def test_golden_images_match_the_original():
    golden = torch.load(GOLDEN, weights_only=True)
    out = AugmentPipe(p=1).apply(golden["images_in"], golden_params(golden))
    torch.testing.assert_close(out, golden["images_out"], rtol=0, atol=1e-4)


def test_golden_images_do_not_depend_on_an_enclosing_autocast():
    """The training step's bf16 autocast (up to 0.17 off before) reaches neither the resampling nor the labels."""
    golden = torch.load(GOLDEN, weights_only=True)
    params = golden_params(golden)
    expected = AugmentPipe(p=1).apply(golden["images_in"], params)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16):
        out = AugmentPipe(p=1).apply(golden["images_in"], params)
        _, labels = AugmentPipe(p=1)(golden["images_in"], generator=torch.Generator().manual_seed(0))
    assert out.dtype == labels.dtype == torch.float32
    assert torch.equal(out, expected)
    torch.testing.assert_close(out, golden["images_out"], rtol=0, atol=1e-4)


def test_golden_images_match_in_a_larger_batch_of_untouched_images():
    """Untouched batch mates neither change the golden images nor get resampled themselves."""
    golden = torch.load(GOLDEN, weights_only=True)
    params, images = golden_params(golden), golden["images_in"]
    untouched = random_images(batch=3, seed=9)
    fields = ("xflip", "yflip", "scale_w", "angle", "aniso_w", "aniso_angle", "translate_w")
    zero = fixed_params(3)
    mixed = AugmentParams(*(torch.cat([getattr(zero, name)[:1], getattr(params, name), getattr(zero, name)[1:]])
                            for name in fields), params.scale_std, params.aniso_std, params.translate_std)
    out = AugmentPipe(p=1).apply(torch.cat([untouched[:1], images, untouched[1:]]), mixed)
    torch.testing.assert_close(out[1:7], golden["images_out"], rtol=0, atol=1e-4)
    assert torch.equal(out[[0, 7, 8]], untouched)


@pytest.mark.parametrize("shift, expected", [
    ((0, 0), (6, 6, 6, 6)),     # the filters' support only
    ((3, -2), (9, 4, 3, 8)),    # content moved right and up reads further left and down
    ((40, 0), (31, 6, 0, 6)),   # clipped to the image size
])
def test_margin_is_the_reach_of_the_corners_plus_the_filter_support(shift, expected):
    params = fixed_params(translate_w=[shift[0] / SIZE, shift[1] / SIZE])
    assert batch_margins(params.inverse_affine(SIZE, SIZE), SIZE, SIZE) == expected


def test_margin_is_shared_by_the_batch():
    inverse = fixed_params(2, translate_w=torch.tensor([[3 / SIZE, 0.0], [0.0, 5 / SIZE]])).inverse_affine(SIZE, SIZE)
    assert batch_margins(inverse, SIZE, SIZE) == (9, 11, 6, 6)
    # Magnified content reads less than the image: the margin shrinks below the filter's 6.
    assert batch_margins(fixed_params(scale_w=1.0).inverse_affine(SIZE, SIZE), SIZE, SIZE) == (0, 0, 0, 0)


def test_zeros_enter_beyond_the_margin_clipped_to_the_image_size():
    # Shrunk 4x, the corners read 62 px from the centre; the reflection stops at 15.5 + 31.
    out = AugmentPipe().apply(torch.ones(1, 1, SIZE, SIZE), fixed_params(scale_w=-2.0))
    torch.testing.assert_close(out[..., 8:23, 8:23], torch.ones(1, 1, 15, 15), rtol=0, atol=1e-4)
    for edge in (out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1]):
        assert edge.abs().max() < 1e-4


def test_an_image_is_padded_by_its_batchs_margin():
    """As in the original: a batch mate that reads further widens the reflection for every image."""
    image, shrunk = torch.ones(1, 1, SIZE, SIZE), fixed_params(scale_w=-1.3)
    alone = AugmentPipe().apply(image, shrunk)
    mates = fixed_params(2, scale_w=torch.tensor([-1.3, 0.0]), translate_w=torch.tensor([[0.0, 0.0], [0.95, 0.95]]))
    together = AugmentPipe().apply(image.expand(2, 1, SIZE, SIZE), mates)[:1]
    torch.testing.assert_close(interior(together), interior(alone), rtol=0, atol=1e-5)
    # The shrunk image's own margin is 29; its mate's 31 reflects where zeros entered its top left.
    assert (together[..., 0, :] - alone[..., 0, :]).abs().max() > 2e-4


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


def test_images_are_never_read_on_the_host():
    """Everything data-dependent is decided from the CPU draws, so on a GPU the pipe never waits for
    it: meta tensors have no values, and reading one (``.item()``, ``.tolist()``, ``if``) raises."""
    images = torch.empty(16, 3, SIZE, SIZE, device="meta")
    out, labels = AugmentPipe(p=0.5)(images, generator=torch.Generator().manual_seed(10))
    assert out.shape == images.shape and out.device.type == "meta" and labels.shape == (16, 9)


def test_the_one_copy_upload_gives_back_every_tensor_exactly():
    """The CUDA branch's packing (one float32 copy, then each piece cast back), run on the CPU."""
    tensors = [torch.tensor([True, False, True]), torch.tensor([0, 2, 2**24 - 1]), torch.randn(2, 2, 3),
               torch.randn(3, 9), torch.zeros(0, 2, 3)]
    uploaded = augment._upload(tensors, torch.device("cpu"), one_copy=True)
    for got, expected in zip(uploaded, tensors):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_the_pipe_gives_the_same_images_through_the_one_copy_upload(monkeypatch):
    images = random_images(16)
    expected = AugmentPipe(p=0.5)(images, generator=torch.Generator().manual_seed(4))
    upload = augment._upload
    monkeypatch.setattr(augment, "_upload", lambda tensors, device: upload(tensors, device, one_copy=True))
    got = AugmentPipe(p=0.5)(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], images)


def test_cudnn_autotuning_is_off_for_the_resampling_only(monkeypatch):
    """Its convolutions change shape nearly every step (model/augment.py's _resample): under
    --cudnn_benchmark each new shape would be timed again."""
    seen = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args, **kwargs: seen.append(torch.backends.cudnn.benchmark)
                        or conv2d(*args, **kwargs))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    AugmentPipe(p=1)(random_images(), generator=torch.Generator().manual_seed(0))
    assert seen == [False, False] and torch.backends.cudnn.benchmark


def test_pipe_still_works_after_its_model_is_moved_or_cast():
    images = random_images()
    expected = AugmentPipe(p=1)(images, generator=torch.Generator().manual_seed(11))
    moved = AugmentPipe(p=1).to(torch.device("cpu")).double()  # as EDM(...).to(device) or .double() does
    got = moved(images, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_pipe_adds_nothing_to_a_state_dict():
    assert AugmentPipe().state_dict() == {}


@pytest.mark.parametrize("kwargs, word", [(dict(p=1.5), "augment_prob"), (dict(rotate=-1), "rotate")])
def test_bad_settings_raise_user_error(kwargs, word):
    with pytest.raises(UserError, match=word):
        AugmentPipe(**kwargs)
