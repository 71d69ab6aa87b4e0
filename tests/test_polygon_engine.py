"""Properties of the polygon engine (TOS §4.1) and of the validity fitter built on it."""
import math

import numpy as np
import pytest
import torch

from worlds import polygons


def test_renders_are_binary_centred_64x64():
    img = polygons.render(5, 22.0, 3.0)
    assert img.shape == (64, 64) and img.dtype == np.uint8
    assert set(np.unique(img)) == {0, 1}
    ys, xs = np.nonzero(img)
    # a regular polygon's centroid is its centre (within a pixel of rasterisation)
    assert abs(xs.mean() + 0.5 - 32) < 1 and abs(ys.mean() + 0.5 - 32) < 1.5


@pytest.mark.parametrize("n", polygons.N_VERTICES)
def test_area_grows_with_radius_as_a_regular_polygon(n):
    areas = [int(polygons.render(n, r, 0.0).sum()) for r in (15, 20, 25, 30)]
    assert areas == sorted(areas) and len(set(areas)) == 4
    for r, a in zip((15, 20, 25, 30), areas):
        exact = n / 2 * r * r * math.sin(2 * math.pi / n)
        assert abs(a - exact) / exact < 0.15  # PIL fills the boundary pixels too


def test_more_vertices_fill_more_of_the_circle():
    areas = [int(polygons.render(n, 25.0, 0.0).sum()) for n in polygons.N_VERTICES]
    assert areas == sorted(areas) and len(set(areas)) == 4


def test_rotation_moves_the_corners():
    left, none, right = (polygons.render(3, 25.0, r) for r in (-10.0, 0.0, 10.0))
    assert (left != right).sum() > 50

    def top_corner_x(img):
        row = np.nonzero(img.any(1))[0][0]
        return np.nonzero(img[row])[0].mean() + 0.5

    # 0 puts a corner straight up; positive rotation turns it clockwise, i.e. to the right
    assert top_corner_x(left) < top_corner_x(none) < top_corner_x(right)
    assert abs(top_corner_x(none) - 32) <= 1
    # -theta is the mirror image of +theta, up to rasterisation
    assert (left != right[:, ::-1]).sum() < 0.02 * left.sum()


def test_vertex_count_radius_and_rotation_can_be_recovered():
    fitter = polygons.PolygonFitter(torch.device("cpu"))
    params = polygons.sample_params(np.random.default_rng(3), 40)
    fit, mse = fitter.fit(polygons.render_batch(params))
    assert (fit[:, 0] == params[:, 0]).all()
    assert np.abs(fit[:, 1] - params[:, 1]).max() <= 1.0  # a pixel grid cannot tell radii closer than that
    # a degree moves a corner of a radius-15 polygon by a quarter of a pixel, so small ones are ambiguous
    rot_err = np.abs(fit[:, 2] - params[:, 2])
    assert rot_err.max() <= 3.0 and np.median(rot_err) <= 1.0
    assert mse.max() < 0.05 and mse.mean() < 0.005  # every real render is valid under the default threshold
    # a blank image or noise is far from every polygon
    _, far = fitter.fit(torch.cat([-torch.ones(1, 1, 64, 64), torch.rand(1, 1, 64, 64) * 2 - 1]))
    assert far.min() > 0.2


def test_render_batch_rounds_and_clips_any_vector():
    x = polygons.render_batch(np.array([[4.4, 40.0, 99.0], [2.0, 1.0, -99.0]]))
    assert x.shape == (2, 1, 64, 64) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(x[0, 0], torch.tensor(polygons.render(4, 30.0, 10.0)).float() * 2 - 1)
    assert torch.equal(x[1, 0], torch.tensor(polygons.render(3, 15.0, -10.0)).float() * 2 - 1)
