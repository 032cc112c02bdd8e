"""Streams: seeded synthetic streams (smooth and shuffled) and the adapters."""

import numpy as np
import pytest
import torch

from partime_sim import streams
from partime_sim.errors import ConfigError
from partime_sim.streams import (
    SEGMENT_FRAMES, STREAMS, Stream, from_arrays, from_npz, from_torch_dataset, make_stream,
)

IMAGE, VECTOR = (3, 32, 32), (32,)


def step(stream):
    """Mean distance between consecutive samples."""
    x = stream.x.reshape(len(stream), -1)
    return float(np.linalg.norm(np.diff(x, axis=0), axis=1).mean())


@pytest.mark.parametrize("name, shape", [("shapes", IMAGE), ("shapes", VECTOR), ("drift", VECTOR),
                                         ("drift", (2, 4, 4)), ("shuffled:shapes", VECTOR)])
def test_same_seed_same_arrays_other_seed_other_arrays(name, shape):
    a, b = make_stream(name, 300, shape, 10, seed=4), make_stream(name, 300, shape, 10, seed=4)
    c = make_stream(name, 300, shape, 10, seed=5)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (300, *shape) and a.x.dtype == np.float32
    assert a.name == name and a.input_shape == shape and len(a) == 300


@pytest.mark.parametrize("shape", [IMAGE, VECTOR])
def test_shapes_labels_come_in_segments_of_one_class(shape):
    s = make_stream("shapes", 3000, shape, 10, seed=1)
    assert s.y.dtype == np.int64 and s.num_classes == 10 and s.num_outputs == 10 and s.smooth
    assert s.y.min() >= 0 and s.y.max() < 10
    change = np.flatnonzero(np.diff(s.y)) + 1
    lengths = np.diff(np.concatenate([[0], change]))
    assert lengths.min() >= SEGMENT_FRAMES[0] and lengths.max() <= SEGMENT_FRAMES[1]
    assert len(np.unique(s.y)) >= 8  # ~20 segments visit most classes


@pytest.mark.parametrize("name, shape", [("shapes", IMAGE), ("shapes", VECTOR), ("drift", VECTOR)])
def test_smooth_stream_moves_much_less_per_step_than_shuffled(name, shape):
    smooth = make_stream(name, 2000, shape, 10, seed=2)
    shuffled = make_stream(f"shuffled:{name}", 2000, shape, 10, seed=2)
    assert step(smooth) < 0.3 * step(shuffled)
    assert not shuffled.smooth and shuffled.name == f"shuffled:{name}"


def test_shuffled_is_a_permutation_of_the_same_samples():
    s = make_stream("shapes", 500, VECTOR, 10, seed=3)
    sh = make_stream("shuffled:shapes", 500, VECTOR, 10, seed=3)
    assert not np.array_equal(s.x, sh.x)
    order = np.lexsort(s.x.T)
    order_sh = np.lexsort(sh.x.T)
    assert np.array_equal(s.x[order], sh.x[order_sh]) and np.array_equal(s.y[order], sh.y[order_sh])


def test_drift_is_regression_with_a_slowly_turning_map():
    s = make_stream("drift", 2000, VECTOR, 3, seed=0)
    assert s.num_classes is None and s.y.shape == (2000, 3) and s.y.dtype == np.float32
    assert 0.7 < s.y.std() < 1.3
    # y_t = W_t x_t: a least-squares fit on a short window explains it almost exactly, an early
    # window's map fits later samples clearly worse (the map has drifted)
    x, y = s.x.astype(float), s.y.astype(float)
    w_early = np.linalg.lstsq(x[:200], y[:200], rcond=None)[0]
    resid = lambda lo, hi: np.mean((x[lo:hi] @ w_early - y[lo:hi]) ** 2) / np.mean(y[lo:hi] ** 2)  # noqa: E731
    assert resid(0, 200) < 1e-3
    assert resid(1200, 1400) > 0.5


def test_vector_shapes_are_learnable_by_a_nearest_centroid():
    s = make_stream("shapes", 6000, VECTOR, 10, seed=0)
    half = len(s) // 2
    x_fit, y_fit, x_test, y_test = s.x[:half], s.y[:half], s.x[half:], s.y[half:]
    centroids = np.stack([x_fit[y_fit == c].mean(0) if (y_fit == c).any() else np.full(32, np.inf)
                          for c in range(10)])
    pred = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y_test).mean() > 0.5  # chance is 0.1


def test_images_show_the_object_and_change_with_the_class():
    s = make_stream("shapes", 400, (1, 16, 16), 4, seed=0)
    assert s.x.max() > 0.3  # an object is drawn
    assert (s.x < 0.1).mean() > 0.3  # on a dark background
    assert s.x.shape == (400, 1, 16, 16) and s.y.max() < 4


def test_astype_casts_inputs_and_float_targets():
    s = make_stream("drift", 10, VECTOR, 2).astype(np.float64)
    assert s.x.dtype == np.float64 and s.y.dtype == np.float64
    c = make_stream("shapes", 10, VECTOR, 10).astype(np.float64)
    assert c.x.dtype == np.float64 and c.y.dtype == np.int64


@pytest.mark.parametrize("args, match", [
    (("waves", 10, VECTOR, 10), r"'waves' is unknown; use one of shapes, drift, shuffled:NAME"),
    (("shuffled:waves", 10, VECTOR, 10), r"'waves' is unknown"),
    (("shapes", 0, VECTOR, 10), r"num_samples=0"),
    (("shapes", 10, (32, 32), 10), r"\(1, H, W\)"),
    (("shapes", 10, (3, 4, 4), 10), "too small"),
    (("shapes", 10, VECTOR, 1), "num_outputs >= 2"),
    (("shapes", 10, (0,), 10), "input_shape"),
    (("drift", 10, VECTOR, 2, -1), "seed=-1"),
])
def test_bad_stream_requests_are_refused_clearly(args, match):
    with pytest.raises(ConfigError, match=match):
        make_stream(*args)


def test_streams_table_lists_every_name():
    assert set(STREAMS) == {"shapes", "drift", "shuffled:NAME"}


# ---- adapters ---------------------------------------------------------------------------------

def test_npz_round_trip(tmp_path):
    s = make_stream("shapes", 50, VECTOR, 10, seed=0)
    np.savez(tmp_path / "cam.npz", x=s.x, y=s.y, frames=s.x)
    back = from_npz(tmp_path / "cam.npz", input_shape=VECTOR)
    assert np.array_equal(back.x, s.x) and np.array_equal(back.y, s.y)
    assert back.num_classes == int(s.y.max()) + 1 and back.name == "cam"
    other = from_npz(tmp_path / "cam.npz", x_key="frames", num_classes=10)
    assert other.num_classes == 10
    with pytest.raises(ConfigError, match=r"no array 'labels' \(it has \['frames', 'x', 'y'\]\)"):
        from_npz(tmp_path / "cam.npz", y_key="labels")
    with pytest.raises(ConfigError, match="does not exist"):
        from_npz(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match=r"samples have shape \(32,\) but the network takes \(3, 32, 32\)"):
        from_npz(tmp_path / "cam.npz", input_shape=IMAGE)


def test_arrays_and_pairs_give_the_same_stream():
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    y = np.array([0, 1, 2, 1, 0, 2])
    a = from_arrays(x, y)
    b = from_arrays(zip(x, y))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and a.x.dtype == np.float32
    assert a.num_classes == 3
    reg = from_arrays(x, y.astype(float))  # float targets: regression, (N, 1)
    assert reg.num_classes is None and reg.y.shape == (6, 1)
    with pytest.raises(ConfigError, match="6 samples but y has 5"):
        from_arrays(x, y[:5])
    with pytest.raises(ConfigError, match="sample 1 has shape"):
        from_arrays([(np.zeros(3), 0), (np.zeros(4), 1)])
    with pytest.raises(ConfigError, match="not an \\(x, y\\) pair"):
        from_arrays([np.zeros(3)])
    with pytest.raises(ConfigError, match=r"label 3 is outside \[0, 3\)"):
        from_arrays(x, y + 1, num_classes=3)


def test_torch_dataset_round_trip():
    x = torch.randn(20, 3, 8, 8)
    y = torch.randint(0, 5, (20,))
    ds = torch.utils.data.TensorDataset(x, y)
    s = from_torch_dataset(ds, input_shape=(3, 8, 8), num_classes=5)
    assert np.array_equal(s.x, x.numpy()) and np.array_equal(s.y, y.numpy()) and s.name == "TensorDataset"
    assert len(from_torch_dataset(ds, num_samples=7)) == 7
    with pytest.raises(ConfigError, match="num_samples=30 but dataset 'TensorDataset' has 20"):
        from_torch_dataset(ds, num_samples=30)

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.ones(2), 1

    assert len(from_torch_dataset(Endless(), num_samples=4)) == 4
    with pytest.raises(ConfigError, match="pass num_samples="):
        from_torch_dataset(Endless())


def test_stream_checks_its_own_fields():
    with pytest.raises(ConfigError, match="3 inputs but 2 targets"):
        Stream(np.zeros((3, 2), np.float32), np.zeros(2, np.int64), 2)
    with pytest.raises(ConfigError, match="regression targets"):
        Stream(np.zeros((3, 2), np.float32), np.zeros(3, np.int64), None)


def test_drift_map_too_large_for_memory_is_low_rank(monkeypatch):
    # a 256x256 output map of a 3x256x256 frame: a dense map would take 192 GiB
    big = make_stream("drift", 3, (3, 256, 256), 256 * 256, seed=0)
    assert big.y.shape == (3, 256 * 256) and 0.9 < big.y.std() < 1.1
    monkeypatch.setattr(streams, "DRIFT_DENSE_MAX", 0)
    monkeypatch.setattr(streams, "DRIFT_RANK", 2)
    s = make_stream("drift", 500, VECTOR, 8, seed=0)
    y = s.y.astype(float)
    assert np.linalg.matrix_rank(y, tol=1e-4 * np.abs(y).max()) == 4  # cos(φ) A x + sin(φ) B x, A and B rank 2
    x = s.x.astype(float)  # still a linear map of x_t over a short window
    w = np.linalg.lstsq(x[:50], y[:50], rcond=None)[0]
    assert np.mean((x[:50] @ w - y[:50]) ** 2) / np.mean(y[:50] ** 2) < 1e-3
