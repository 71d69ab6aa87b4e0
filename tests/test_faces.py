"""The faces foundation in worlds/faces.py and worlds/face_nets.py: splits and cached renders, the real-face loaders,
the synthetic f and the verification protocol. (The renderer has its tests in test_face_world.py, the dlib port in
test_dlib_port.py.)"""
import contextlib
import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

import common
from worlds import face_nets
from worlds import faces


@contextlib.contextmanager
def usage_error(pattern: str):
    """Expect a one-line UsageError whose message matches ``pattern``."""
    with pytest.raises(common.UsageError) as info:
        yield
    assert re.search(pattern, info.value.message) and "\n" not in info.value.message, info.value.message


def test_splits_share_no_identity():
    splits = {name: set(faces.split_identity_indices(name, 5000).tolist()) for name in faces.FACE_SPLITS}
    names = list(splits)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not splits[names[a]] & splits[names[b]], (names[a], names[b])
    # and no two identities of different splits look alike in their attributes either
    va = np.stack([faces.attribute_vector(faces.sample_identity(0, int(i)))
                   for i in faces.split_identity_indices("f", 50)])
    vb = np.stack([faces.attribute_vector(faces.sample_identity(0, int(i)))
                   for i in faces.split_identity_indices("eval", 50)])
    assert np.abs(va[:, None] - vb[None]).sum(-1).min() > 0


def test_unknown_split_is_a_usage_error():
    with usage_error("unknown face split"):
        faces.split_identity_indices("train", 3)


def test_synthetic_faces_are_cached_and_do_not_depend_on_workers(tmp_path):
    a = faces.synthetic_faces("eval", 3, 2, 64, cache=tmp_path, workers=1)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and a["images"].shape == (6, 3, 64, 64) and a["images"].dtype == torch.uint8
    assert a["identity"].tolist() == [i for i in faces.split_identity_indices("eval", 3) for _ in range(2)]
    b = faces.synthetic_faces("eval", 3, 2, 64, cache=tmp_path)  # from the cache
    assert torch.equal(a["images"], b["images"])
    c = faces.render_faces(faces.split_identity_indices("eval", 3), 2, 64, workers=2, progress=False)[0]
    assert torch.equal(a["images"], c)
    assert not torch.equal(a["images"][0], a["images"][1])  # two nuisances of one identity differ


def _write_folder(root, layout):
    for rel, colour in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 50), colour).save(path)


def test_face_folder_with_identity_subfolders(tmp_path):
    _write_folder(tmp_path, {"ann/1.png": (255, 0, 0), "ann/2.jpg": (250, 0, 0), "bob/1.png": (0, 0, 255)})
    (tmp_path / "ann" / "notes.txt").write_text("not an image")
    data = faces.load_face_folder(str(tmp_path), 64)
    assert data["images"].shape == (3, 3, 64, 64)
    assert data["identity"].tolist() == [0, 0, 1] and data["names"] == ["ann", "bob"]
    assert data["images"][2, 2].float().mean() > 250 and data["images"][2, 0].float().mean() < 5  # bob is blue


def test_face_folder_with_an_identity_file(tmp_path):
    _write_folder(tmp_path, {"img/000001.jpg": (255, 0, 0), "img/000002.jpg": (0, 255, 0),
                             "img/000003.jpg": (0, 0, 255)})
    (tmp_path / "identity.txt").write_text("000001.jpg 10\n000002.jpg 2\n000003.jpg 10\n")
    data = faces.load_face_folder(str(tmp_path), 64)
    assert data["names"] == ["2", "10"] and data["identity"].tolist() == [0, 1, 1]
    assert data["files"][0].endswith("000002.jpg")
    (tmp_path / "identity.txt").write_text("000001.jpg\n")
    with usage_error("line 1"):
        faces.load_face_folder(str(tmp_path), 64)


def test_face_folder_flat_and_errors(tmp_path):
    _write_folder(tmp_path, {"a.png": (1, 2, 3), "b.png": (4, 5, 6)})
    data = faces.load_face_folder(str(tmp_path), 64)
    assert data["identity"].tolist() == [0, 1]
    (tmp_path / "c.png").write_bytes(b"not a png")
    with usage_error("cannot read .*c.png"):
        faces.load_face_folder(str(tmp_path), 64)
    (tmp_path / "empty").mkdir()
    with usage_error("no images"):
        faces.load_face_folder(str(tmp_path / "empty"), 64)
    with usage_error("is not a folder"):
        faces.load_face_folder(str(tmp_path / "missing"), 64)


def test_celeba_failure_gives_the_hint(tmp_path):
    with usage_error("by hand"):
        faces.load_celeba(str(tmp_path), "valid", 64, download=False)


def test_verification_accuracy_on_known_codes():
    ids = np.repeat(np.arange(100), 2)
    perfect = torch.nn.functional.one_hot(torch.from_numpy(ids), 100).float()
    assert face_nets.verification_accuracy(perfect, ids, 500)["accuracy"] == 1.0
    assert face_nets.verification_accuracy(perfect, ids, 500, threshold=0.6)["accuracy"] == 1.0
    noise = torch.randn(200, 16)
    assert abs(face_nets.verification_accuracy(noise, ids, 500)["accuracy"] - 0.5) < 0.1


def test_arcface_margin_raises_the_loss():
    code = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    weight, label = torch.randn(5, 16), torch.randint(5, (8,))
    assert face_nets.arcface_loss(code, weight, label, m=0.3) > face_nets.arcface_loss(code, weight, label, m=0.0)


@pytest.mark.parametrize("arch", ["resnet", "plain"])
def test_face_identity_net_shapes_and_gradient(arch):
    net = face_nets.FaceIdentityNet(arch, dim=32, width=8)
    x = torch.rand(2, 3, 96, 96, requires_grad=True)
    code = net(x * 2 - 1)
    assert code.shape == (2, 32) and torch.allclose(code.norm(dim=1), torch.ones(2), atol=1e-5)
    code.sum().backward()
    assert x.grad.abs().sum() > 0


def test_a_small_trained_f_tells_identities_apart(tmp_path):
    """Two nuisances of one identity are closer under the trained f than two identities are (on average)."""
    cfg = face_nets.FaceNetConfig(identities=40, per_identity=6, steps=150, batch=64, width=8, lr=0.05)
    net, metrics = face_nets.load_face_net(cfg, cache=tmp_path, log=lambda *_: None)
    held = faces.synthetic_faces("f_val", 30, 2, 64, cache=tmp_path)
    code = face_nets.embed(net, held["images"])
    same = (code[0::2] - code[1::2]).norm(dim=1).mean()
    other = (code[0::2] - code[1::2].roll(1, 0)).norm(dim=1).mean()
    assert same < 0.8 * other
    assert metrics["accuracy"] > 0.6
    again, _ = face_nets.load_face_net(cfg, cache=tmp_path)  # from the cache, identical
    assert torch.equal(face_nets.embed(again, held["images"]), code)


def test_style_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    assert torch.equal(face_nets.style_augment(x, p=0.0), x)
    a = face_nets.style_augment(x, 1.0, torch.Generator().manual_seed(3))
    b = face_nets.style_augment(x, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert (a - x).abs().flatten(1).amax(1).min() > 0.01      # every image changed


def test_style_aug_is_part_of_the_cache_key(tmp_path):
    cfg = face_nets.FaceNetConfig(identities=8, per_identity=2, steps=2, batch=8, width=4)
    for aug in (0.0, 0.5):
        face_nets.load_face_net(dataclasses.replace(cfg, style_aug=aug), cache=tmp_path, log=lambda *_: None)
    assert len(list(tmp_path.glob("facenet_*.pt"))) == 2


def test_command_line_sheet_and_bench(run, tmp_path):
    out = tmp_path / "sheet.png"
    res = run("worlds", "face-sheet", "--out", str(out), "--identities", "2", "--nuisances", "3", "--size", "64")
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    res = run("worlds", "face-bench", "--n", "20", "--repeats", "1")
    assert res.returncode == 0 and "images/s" in res.stdout, res.stderr
    res = run("worlds", "face-sheet", "--bogus")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
