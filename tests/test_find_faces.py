"""Faces in any photo (worlds/face_nets.py): read_photo's EXIF and formats, find_faces' detection and chip alignment."""
import numpy as np
import pytest
from PIL import Image

import common
from worlds import face_nets, faces


def face(index: int) -> np.ndarray:
    """A synthetic face photo at 152 px, which dlib's detector finds."""
    return faces.render_photo(faces.sample_identity(0, index), faces.canonical_nuisance(), 152)


def scene(*placed, size=(500, 400)) -> Image.Image:
    """A grey photo of ``size`` (width, height) with faces pasted at (x, y), each turned by an angle (degrees)."""
    img = Image.new("RGB", size, (128, 128, 128))
    for photo, (x, y), angle in placed:
        tile = Image.fromarray(photo).rotate(angle, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
        img.paste(tile, (x, y))
    return img


def best_shift(a: np.ndarray, b: np.ndarray, reach: int = 6) -> tuple[int, int, float]:
    """The integer shift (dy, dx) of b that fits a best, and the mean absolute difference there (0-255)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    core = (slice(reach, -reach), slice(reach, -reach))
    scores = {(dy, dx): np.abs(a[core] - np.roll(b, (dy, dx), (0, 1))[core]).mean()
              for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)}
    (dy, dx), mad = min(scores.items(), key=lambda kv: kv[1])
    return dy, dx, float(mad)


def test_a_face_moved_and_turned_in_a_scene_gives_the_same_chip():
    alone = face_net_chips(scene((face(3), (174, 124), 0.0)))
    moved = face_net_chips(scene((face(3), (40, 200), 8.0), size=(700, 520)))
    assert len(alone) == 1 and len(moved) == 1
    assert alone[0].shape == moved[0].shape == (150, 150, 3)
    dy, dx, mad = best_shift(alone[0], moved[0])
    assert abs(dy) <= 3 and abs(dx) <= 3 and mad < 25, (dy, dx, mad)


def face_net_chips(photo: Image.Image) -> list[np.ndarray]:
    return [f["chip"] for f in face_nets.find_faces(photo)]


def test_two_faces_give_two_chips_left_to_right_with_their_boxes():
    found = face_nets.find_faces(scene((face(1), (380, 60), 0.0), (face(2), (30, 200), 0.0), size=(600, 420)))
    assert len(found) == 2
    first, second = found[0]["box"], found[1]["box"]
    assert first[2] < 250 and second[0] > 350 and first[1] > 150 and second[3] < 260
    for f in found:
        assert f["landmarks"].shape == (5, 2)
        left, top, right, bottom = f["box"]
        assert (left - 20 <= f["landmarks"][:, 0]).all() and (f["landmarks"][:, 0] <= right + 20).all()


def test_a_blank_photo_has_no_face():
    assert face_nets.find_faces(Image.new("RGB", (320, 240), (90, 90, 90))) == []


def test_a_large_photo_is_searched_at_a_smaller_size_and_cut_from_the_original():
    big = scene((face(4), (900, 700), 0.0), size=(2400, 1800)).resize((4800, 3600), Image.BICUBIC)
    found = face_nets.find_faces(big, detect_side=1200)
    assert len(found) == 1
    left, top, right, bottom = found[0]["box"]
    assert 1700 < left < 2200 and 1300 < top < 1800 and found[0]["chip"].shape == (150, 150, 3)


def test_read_photo_turns_by_exif_and_takes_any_mode(tmp_path):
    rgb = Image.fromarray(face(5))
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 CW to view": a phone held upright
    wide = rgb.resize((200, 100))
    wide.save(tmp_path / "phone.jpg", exif=exif)
    assert face_nets.read_photo(tmp_path / "phone.jpg").size == (100, 200)
    rgb.convert("L").save(tmp_path / "grey.png")
    rgb.convert("RGBA").save(tmp_path / "alpha.png")
    for name in ("grey.png", "alpha.png"):
        img = face_nets.read_photo(tmp_path / name)
        assert img.mode == "RGB" and img.size == (152, 152)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(common.UsageError) as err:
        face_nets.read_photo(tmp_path / "text.jpg")
    assert "not a readable image" in err.value.message
