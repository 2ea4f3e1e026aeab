"""AugmentPipe: golden reproduction (random-draw protocol), non-leaking identity at p=0, and the
meaning of each label group."""

import numpy as np
import pytest
import torch

from helpers import rel_err
from training.augment import SYM6, AugmentPipe

FULL = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1,
            translate_frac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def images(n=4, c=3, res=16, seed=0) -> torch.Tensor:
    return torch.rand([n, c, res, res], generator=torch.Generator().manual_seed(seed)) * 2 - 1

# --- golden vectors ---------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['augment_geom_p012', 'augment_all_p1'])
def test_golden(golden_dir, name):
    g = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    torch.manual_seed(g['torch_seed'])
    out, labels = AugmentPipe(**g['kwargs'])(g['images'])
    assert labels.shape == g['labels'].shape
    assert rel_err(labels, g['labels']) <= 1e-5
    assert out.shape == g['output'].shape
    assert rel_err(out, g['output']) <= 1e-5


# --- non-leaking: p=0 is the identity ---------------------------------------------------------

@pytest.mark.parametrize('channels', [1, 3])
def test_p0_is_identity_with_zero_labels(channels):
    x = images(c=channels)
    out, labels = AugmentPipe(p=0, **FULL)(x)
    assert labels.shape == (4, 19) and torch.all(labels == 0)
    # The geometric branch still resamples (sym6 up/down + bilinear at pixel centres): exact up to rounding.
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_sym6_is_orthonormal_lowpass():
    h = np.asarray(SYM6, dtype=np.float64)
    assert len(h) == 12
    assert abs(h.sum() - np.sqrt(2)) < 1e-12
    for k in range(6):  # <h, h shifted by 2k> = delta_k: up-then-down sampling is the identity
        assert abs(np.dot(h[: len(h) - 2 * k], h[2 * k:]) - (k == 0)) < 1e-11

# --- label semantics --------------------------------------------------------------------------

def test_xflip_labels():
    x = images(n=16)
    torch.manual_seed(1)
    out, labels = AugmentPipe(p=1, xflip=1e8)(x)  # probability >= 1: the label is the coin flip itself
    assert labels.shape == (16, 1)
    assert set(labels.flatten().tolist()) == {0.0, 1.0}
    for i in range(16):
        expected = x[i].flip(2) if labels[i, 0] == 1 else x[i]
        assert torch.equal(out[i], expected)


def test_rotate_int_labels_are_quarter_turns():
    x = images(n=16)
    torch.manual_seed(2)
    out, labels = AugmentPipe(p=1, rotate_int=1e8)(x)
    assert labels.shape == (16, 2)
    # labels = ((k==1)|(k==2), (k==2)|(k==3)) for k counter-clockwise quarter turns.
    code = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for i in range(16):
        k = code[tuple(int(v) for v in labels[i].tolist())]
        seen.add(k)
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(1, 2)))
    assert len(seen) > 1


@pytest.mark.parametrize('kwargs', [dict(p=-0.1), dict(xflip=float('nan')), dict(scale_std=float('inf'))])
def test_rejects_bad_kwargs(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AugmentPipe(**kwargs)


def test_rotate_int_rejects_non_square():
    with pytest.raises(ValueError, match='square'):
        AugmentPipe(rotate_int=1)(torch.zeros([1, 3, 8, 12]))


def test_translate_int_shifts_by_whole_pixels():
    x = images(n=8, res=32)
    torch.manual_seed(3)
    out, labels = AugmentPipe(p=1, translate_int=1e8)(x)
    shifts = labels * 32 * 0.125  # labels are the shifts relative to translate_int_max * size
    assert torch.equal(shifts, shifts.round()) and shifts.abs().max() <= 4 and shifts.abs().max() > 0
    for i in range(8):
        tx, ty = int(shifts[i, 0]), int(shifts[i, 1])
        # Content moves right by tx and up by ty; check a region away from the reflected borders.
        assert torch.equal(out[i, :, 8:24, 8:24], x[i, :, 8 + ty:24 + ty, 8 - tx:24 - tx])


def test_brightness_and_contrast_labels():
    x = images(n=8)
    torch.manual_seed(4)
    out, w = AugmentPipe(p=1, brightness=1e8)(x)
    assert w.shape == (8, 1) and torch.all(w != 0)
    torch.testing.assert_close(out, x + 0.2 * w[:, :, None, None])  # brightness_std = 0.2
    torch.manual_seed(4)
    out, w = AugmentPipe(p=1, contrast=1e8)(x)
    torch.testing.assert_close(out, x * torch.exp2(0.5 * w[:, :, None, None]))  # contrast_std = 0.5


def test_lumaflip_negates_luma_keeps_chroma():
    x = images(n=8)
    torch.manual_seed(5)
    out, w = AugmentPipe(p=1, lumaflip=1e8)(x)
    flipped = w[:, 0] == 1
    assert flipped.any() and (~flipped).any()
    torch.testing.assert_close(out[~flipped], x[~flipped])
    luma = lambda t: t.mean(dim=1)  # projection on the gray axis
    torch.testing.assert_close(luma(out[flipped]), -luma(x[flipped]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[flipped] - luma(out[flipped])[:, None], x[flipped] - luma(x[flipped])[:, None],
                               atol=1e-6, rtol=1e-5)


def test_geometric_translate_frac_matches_label():
    # A fractional translation of a smooth image by label * translate_frac_std * size pixels.
    res = 32
    yy, xx = torch.meshgrid(torch.arange(res, dtype=torch.float32), torch.arange(res, dtype=torch.float32), indexing='ij')
    blob = lambda cx, cy: torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0 ** 2))
    x = blob(15.5, 15.5)[None, None].repeat(4, 3, 1, 1)
    torch.manual_seed(6)
    out, labels = AugmentPipe(p=1, translate_frac=1e8, translate_frac_std=0.05)(x)
    for i in range(4):
        dx, dy = (labels[i] * 0.05 * res).tolist()
        # Content moves by (+dx, +dy) in pixel (x right, y down) coordinates.
        torch.testing.assert_close(out[i, 0, 4:-4, 4:-4], blob(15.5 + dx, 15.5 + dy)[4:-4, 4:-4], atol=2e-2, rtol=0)  # 1 px off would be ~0.2


def test_reproducible_and_shapes_preserved():
    x = images(n=3, c=3, res=16)
    torch.manual_seed(7)
    a = AugmentPipe(p=0.7, **FULL)(x)
    torch.manual_seed(7)
    b = AugmentPipe(p=0.7, **FULL)(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == x.shape and a[0].dtype == x.dtype
    assert torch.isfinite(a[0]).all()


def test_non_square_geometric_and_single_channel_color():
    x = torch.rand([2, 1, 12, 20])
    out, labels = AugmentPipe(p=1, **{k: v for k, v in FULL.items() if k != 'rotate_int'})(x)
    assert out.shape == x.shape and labels.shape == (2, 17)
    assert torch.isfinite(out).all()
