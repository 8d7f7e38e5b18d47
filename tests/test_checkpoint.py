"""save/load: one .npz with the JSON config, atomic, never unpickled, strict on load."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import anynorm
from anynorm.layers._base import CONFIG_KEY

SHAPE = (4, 6, 5)
ALL = [
    lambda: anynorm.L2Norm(axis=(1, 2)),
    lambda: anynorm.L1Norm(axis=None),
    lambda: anynorm.LpNorm(3.0, axis=1, eps=1e-9),
    lambda: anynorm.BatchNorm(6, momentum=None),
    lambda: anynorm.BatchNorm((6, 5), axis=(1, 2), affine=False),
    lambda: anynorm.LayerNorm((6, 5), bias=False),
    lambda: anynorm.GroupNorm(2, 6, eps=1e-3),
    lambda: anynorm.InstanceNorm(6, affine=True, track_running_stats=True),
    lambda: anynorm.RMSNorm(5, eps=1e-4),
    lambda: anynorm.LocalResponseNorm(3, alpha=0.1, beta=0.5, k=2.0),
]


@pytest.mark.parametrize("make", ALL, ids=lambda f: repr(f()))
def test_save_load_round_trip_every_layer(bk, rng, tmp_path, make):
    layer = make()
    x = rng.standard_normal(SHAPE)
    for _ in range(2):
        layer(bk.asarray(x))
        layer.backward(bk.asarray(rng.standard_normal(SHAPE)))
        layer.update(lr=0.1)
    layer.eval()
    expect = bk.to_numpy(layer(bk.asarray(x)))
    path = tmp_path / "layer.npz"
    layer.save(path)
    back = anynorm.load(path)  # NumPy by default
    assert type(back) is type(layer) and back.get_config() == layer.get_config()
    back.eval()
    # on NumPy float64 the only difference left is the case dtype's rounding of the output
    got = back(np.asarray(bk.round(x)))
    assert np.max(np.abs(got - expect)) <= bk.tol * np.max(np.abs(expect))
    there = anynorm.load(path, xp=bk.xp, device=bk.device)
    there.eval()
    y = there(bk.asarray(x))
    bk.check(y, SHAPE)
    bk.close(y, expect)
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f[CONFIG_KEY][()]))
        assert set(f.files) == {*layer.state_dict(), CONFIG_KEY}
    assert meta["class"] == type(layer).__name__ and meta["format_version"] == 1


def test_torch_to_numpy_and_back(torch_oracle, rng, tmp_path):
    torch = torch_oracle
    layer = anynorm.BatchNorm(3)
    for _ in range(3):
        xt = torch.tensor(rng.standard_normal((5, 3, 4)))
        layer(xt)
        layer.backward(torch.tensor(rng.standard_normal((5, 3, 4))))
        layer.update(lr=0.2)
    layer.eval()
    x = rng.standard_normal((5, 3, 4))
    y_torch = layer(torch.tensor(x)).numpy()
    layer.save(tmp_path / "t.npz")
    on_numpy = anynorm.load(tmp_path / "t.npz").eval()
    np.testing.assert_allclose(on_numpy(x), y_torch, rtol=1e-12, atol=1e-12)
    on_numpy.save(tmp_path / "n.npz")
    import array_api_compat.torch as tx

    again = anynorm.load(tmp_path / "n.npz", xp=torch).eval()
    assert again.xp is tx
    np.testing.assert_allclose(again(torch.tensor(x)).numpy(), y_torch, rtol=1e-12, atol=1e-12)


def _write_npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _config(**over):
    meta = {
        "format": "anynorm",
        "format_version": 1,
        "class": "BatchNorm",
        "config": {"num_features": 2},
    }
    meta.update(over)
    return np.asarray(json.dumps(meta))


GOOD = {
    "weight": np.ones(2),
    "bias": np.zeros(2),
    "running_mean": np.zeros(2),
    "running_var": np.ones(2),
    "num_batches_tracked": np.asarray(0),
}


class Boom:
    def __reduce__(self):  # would run on unpickling
        return (os.system, ("echo unpickled > /dev/null",))


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({**GOOD}, "not an anynorm checkpoint"),
        ({**GOOD, CONFIG_KEY: _config(class_="x", **{"class": "Nope"})}, "unknown layer class"),
        ({**GOOD, CONFIG_KEY: _config(format_version=99)}, "format version 99"),
        ({**GOOD, CONFIG_KEY: _config(format="other")}, "has format 'other'"),
        ({**GOOD, CONFIG_KEY: np.asarray("{not json")}, "unreadable config"),
        ({CONFIG_KEY: _config(), "weight": np.ones(2)}, r"missing keys \['bias'"),
        ({**GOOD, "extra": np.ones(2), CONFIG_KEY: _config()}, r"unexpected keys \['extra'\]"),
        ({**GOOD, "weight": np.ones(3), CONFIG_KEY: _config()}, "mis-shaped entries: weight"),
        ({**GOOD, CONFIG_KEY: _config(config={"num_features": 2, "bogus": 1})}, "rejects"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    _write_npz(path, **arrays)
    with pytest.raises(ValueError, match=match):
        anynorm.load(path)


def test_pickled_object_is_refused_without_unpickling(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    path = tmp_path / "evil.npz"
    obj = np.empty((), dtype=object)
    obj[()] = Boom()
    with open(path, "wb") as fh:
        np.savez(fh, **{**GOOD, "weight": obj, CONFIG_KEY: _config()})
    with pytest.raises(ValueError, match="cannot be loaded without pickle"):
        anynorm.load(path)
    assert calls == []


def test_truncated_and_foreign_files_are_refused(tmp_path):
    layer = anynorm.BatchNorm(4, xp=np)
    path = tmp_path / "ok.npz"
    layer.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable anynorm checkpoint|truncated"):
        anynorm.load(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable anynorm checkpoint"):
        anynorm.load(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="single array"):
        anynorm.load(tmp_path / "single.npy")
    with pytest.raises(FileNotFoundError):
        anynorm.load(tmp_path / "missing.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    layer = anynorm.BatchNorm(4, xp=np)
    path = tmp_path / "ckpt.npz"
    layer.save(path)
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK partial")
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        anynorm.BatchNorm(4, momentum=0.5, xp=np).save(path)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]  # no temporary left behind
    assert zipfile.is_zipfile(path)


def test_saving_a_layer_without_arrays_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="no parameters/buffers yet"):
        anynorm.BatchNorm(3).save(tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    anynorm.L2Norm().save(tmp_path / "l2.npz")  # nothing to hold: fine
    assert isinstance(anynorm.load(tmp_path / "l2.npz"), anynorm.L2Norm)
