"""torch_utils/plot.py: round tick values and a PNG line plot drawn with PIL."""

import math

import numpy as np
import PIL.Image
import pytest

from torch_utils import plot


@pytest.mark.parametrize('lo,hi', [(0.01, 0.25), (3.2, 17.9), (-5, 5), (1e-4, 3e-4), (1000, 1e6), (7, 7)])
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi):
    ticks = plot.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5))


def test_line_plot_draws_series_and_highlight(tmp_path):
    path = tmp_path / 'p.png'
    plot.line_plot({'FID': ([0.05, 0.1, 0.15], [12.0, 9.5, float('nan')]), 'other': ([0.05, 0.15], [10, 11])}, str(path),
                   xlabel='sigma_rel', ylabel='FID', title='t', highlight=(0.1, 9.5), size=(400, 300))
    image = np.asarray(PIL.Image.open(path).convert('RGB'))
    assert image.shape == (300, 400, 3)
    for color in plot.COLORS[:2] + [plot.HIGHLIGHT]:  # both series and the highlight ring are drawn
        assert (image == np.array(color, dtype=np.uint8)).all(axis=2).any(), color
    with pytest.raises(ValueError, match='no finite points'):
        plot.line_plot({'x': ([1.0], [float('inf')])}, str(tmp_path / 'q.png'))


def test_scatter_plot_labels_every_point(tmp_path):
    path = tmp_path / 's.png'
    image = plot.scatter_plot([('a', 1.0, 20.0), ('b', 0.5, 25.0)], str(path), xlabel='MB', ylabel='FID', size=(400, 300))
    pixels = np.asarray(PIL.Image.open(path).convert('RGB'))
    assert image.size == (400, 300)
    assert (pixels == np.array(plot.HIGHLIGHT, dtype=np.uint8)).all(axis=2).sum() > 40  # two filled markers
    with pytest.raises(ValueError, match='no points'):
        plot.scatter_plot([], None)


def test_scatter_plot_groups_log_axis_and_labels_that_do_not_collide(tmp_path):
    """Groups get a colour each (the compress report's baselines); log_y spans decades and refuses y <= 0;
    coincident points still get every label that fits, each in its own place."""
    points = [('vp-base', 4.6, 19.0), ('vp-random', 3.7, 469.0), ('ve-base', 4.7, 39.0), ('ve-int4', 0.6, 42.0)]
    image = plot.scatter_plot(points, None, groups=['vp', 'vp', 've', 've'], log_y=True, size=(500, 300))
    pixels = np.asarray(image)
    for color in plot.COLORS[:2]:
        assert (pixels == np.array(color, dtype=np.uint8)).all(axis=2).sum() > 40  # markers and legend entries
    with pytest.raises(ValueError, match='log_y'):
        plot.scatter_plot([('a', 1.0, 0.0)], None, log_y=True)
    one = np.asarray(plot.scatter_plot([('first', 1.0, 20.0)], None, size=(400, 300)))
    two = np.asarray(plot.scatter_plot([('first', 1.0, 20.0), ('second', 1.0, 20.0)], None, size=(400, 300)))
    dark = lambda a: (a.sum(axis=2) < 200).sum()
    assert dark(two) > dark(one) + 20  # the second label was drawn beside the first, not over it


def test_line_plot_draws_every_series(tmp_path):
    path = tmp_path / 'p.png'
    image = plot.line_plot({'a': ([5, 9, 17], [100.0, 30.0, 12.0]), 'b': ([5, 9], [60.0, float('nan')])},
                           str(path), title='t', xlabel='NFE', ylabel='FID', log_y=True)
    assert PIL.Image.open(path).size == image.size == (900, 600)
    pixels = np.asarray(image)
    for color in plot.COLORS[:2]:  # both series' colours appear
        rgb = np.array(color)
        assert (np.abs(pixels.astype(int) - rgb).sum(-1) == 0).sum() > 20, color
    assert plot.nice_ticks(0, 35) == [0, 10, 20, 30, 40]
    assert plot.log_ticks(10, 200) == [10, 20, 50, 100, 200]
