"""The one image decoder (cpubone.images): its rules, and every path that reads pixels seeing the same ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpubone.images import ImageDecodeError, decode_image, exif_orientation

SRC = str(Path(__file__).resolve().parents[1] / "src")
W, H = 24, 16  # not square: a missed or doubled EXIF rotation changes the shape
ORIENTATION = 0x0112


def _gradient() -> np.ndarray:
    """(H, W, 3) uint8 with different rows, columns and channels, so any turn or flip shows."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 10, y * 15, (x * 7 + y * 3) % 256], -1).astype(np.uint8)


def _odd_images(folder: Path) -> dict:
    """Each odd kind of image file, named by kind; every one decodes to W x H."""
    folder.mkdir(parents=True, exist_ok=True)
    g = _gradient()
    ramp = np.linspace(0, 1, W * H, dtype=np.float32).reshape(H, W)
    files = {}

    def save(kind, img, ext, **kw):
        files[kind] = folder / f"{kind}{ext}"
        img.save(files[kind], **kw)

    save("gray16", Image.fromarray((ramp * 40000 + 9000).astype(np.uint16)), ".png")
    save("float32", Image.fromarray(ramp), ".tif")
    rgba = np.dstack([np.full((H, W, 3), (255, 0, 0), np.uint8), np.zeros((H, W), np.uint8)])
    rgba[4:12, 6:18] = (0, 0, 200, 128)  # half-transparent blue on fully transparent red
    save("rgba", Image.fromarray(rgba), ".png")
    pal = Image.fromarray((np.arange(W * H).reshape(H, W) % 4).astype(np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 30, 30, 30])
    save("palette_transparent", pal, ".png", transparency=0)
    save("gray_alpha", Image.fromarray(np.dstack([g[..., 1], g[..., 0]]), mode="LA"), ".png")
    save("cmyk", Image.fromarray(np.dstack([g, g[..., :1]]), mode="CMYK"), ".jpg", quality=95)
    save("bilevel", Image.fromarray(g[..., 0] > 100).convert("1"), ".png")
    save("gray", Image.fromarray(g[..., 0]), ".png")
    # a phone photo: the sensor grid is stored turned, the tag says turn it back (6: 90 degrees clockwise)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(g, k=1)))
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    save("exif_rotated", stored, ".jpg", exif=exif, quality=95)
    return files


def test_importable_without_torch():
    code = ("import sys, numpy as np\nfrom cpubone.images import decode_image\n"
            "decode_image(np.zeros((4, 4), np.uint16))\nassert 'torch' not in sys.modules, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=SRC))
    assert proc.returncode == 0, proc.stderr


def test_rules(tmp_path):
    files = _odd_images(tmp_path)
    g = _gradient()
    ramp = np.linspace(0, 1, W * H, dtype=np.float32).reshape(H, W)
    out = {k: np.asarray(decode_image(p)) for k, p in files.items()}
    assert all(a.shape == (H, W, 3) and a.dtype == np.uint8 for a in out.values())
    gray16 = (ramp * 40000 + 9000).astype(np.uint16)
    assert (out["gray16"][..., 0] == gray16 >> 8).all()  # fixed 16 -> 8 bit scale, not stretched or clipped
    assert (out["float32"][..., 0] == np.rint(ramp * 255)).all()  # [0, 1] floats
    assert out["float32"].max() == 255 and out["float32"].min() == 0
    # fully transparent red shows the white background; half-transparent blue is mixed with it
    assert (out["rgba"][0, 0] == 255).all()
    assert tuple(out["rgba"][8, 10]) == (127, 127, 227)
    p_idx = np.arange(W * H).reshape(H, W) % 4
    assert (out["palette_transparent"][p_idx == 0] == 255).all()  # transparent index 0 (red) is white
    assert (out["palette_transparent"][p_idx == 2] == (0, 0, 255)).all()
    alpha = g[..., 0].astype(np.float64) / 255
    expect_la = np.rint(g[..., 1] * alpha + 255 * (1 - alpha))
    assert np.abs(out["gray_alpha"][..., 0] - expect_la).max() <= 1
    assert (out["bilevel"][..., 0] == np.where(g[..., 0] > 100, 255, 0)).all()
    assert (out["gray"] == g[..., :1]).all()  # grayscale repeated over R, G, B
    for a in (out["gray16"], out["float32"], out["gray_alpha"], out["bilevel"]):
        assert (a == a[..., :1]).all()
    cmyk = np.asarray(Image.open(files["cmyk"]).convert("RGB"))
    assert (out["cmyk"] == cmyk).all()
    # the EXIF tag is applied: the stored (W, H)-swapped grid comes back upright, like the original
    assert exif_orientation(files["exif_rotated"]) == 6
    assert Image.open(files["exif_rotated"]).size == (H, W)
    assert np.abs(out["exif_rotated"].astype(int) - g).mean() < 3  # JPEG noise only
    # a Pillow image gets the same treatment as its file, once: applying the tag again changes nothing
    from PIL import ImageOps

    assert (np.asarray(decode_image(Image.open(files["exif_rotated"]))) == out["exif_rotated"]).all()
    upright = ImageOps.exif_transpose(Image.open(files["exif_rotated"]))
    assert (np.asarray(decode_image(upright)) == out["exif_rotated"]).all()


def test_16bit_gray_and_colour_agree(tmp_path):
    """Pillow reduces 16-bit RGB PNGs to their high byte itself; 16-bit gray must get the same scale."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    values = np.array([0x0000, 0x12FF, 0x3400, 0x80FF, 0xFEFF, 0xFFFF], ">u2")
    rgb48 = tmp_path / "rgb48.png"  # Pillow cannot write 16-bit colour PNGs: a 6x1 one by hand
    rows = b"\x00" + np.repeat(values, 3).tobytes()
    rgb48.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 1, 16, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(values.astype(np.uint16)[None]).save(gray16)
    colour, gray = np.asarray(decode_image(rgb48)), np.asarray(decode_image(gray16))
    assert (colour == gray).all() and (gray[0, :, 0] == values >> 8).all()


def test_arrays_follow_the_same_rules():
    u16 = np.array([[0, 257, 65535], [256, 255, 32768]], np.uint16)
    assert (np.asarray(decode_image(u16))[..., 0] == u16 >> 8).all()
    assert (np.asarray(decode_image(np.array([[0.0, 0.5, 1.0]])))[..., 0] == (0, 128, 255)).all()
    assert (np.asarray(decode_image(np.array([[0.0, 2.0, 200.0]])))[..., 0] == (0, 2, 200)).all()  # 0..255 floats
    # no convention: the finite range is stretched; NaN becomes 0
    assert (np.asarray(decode_image(np.array([[-1.0, 0.0, 3.0, np.nan]])))[..., 0] == (0, 64, 255, 0)).all()
    assert (np.asarray(decode_image(np.array([[True, False]])))[..., 0] == (255, 0)).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    assert (np.asarray(decode_image(rgba)) == 255).all()  # transparent red on white, as a file would
    with pytest.raises(ImageDecodeError, match="int64"):
        decode_image(np.zeros((4, 4), np.int64))
    with pytest.raises(ImageDecodeError, match=r"shape \(4, 4, 2\)"):
        decode_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="got list"):
        decode_image([[0, 1]])


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        decode_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageDecodeError, match="bad.jpg: not a readable image"):
        decode_image(bad)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(ImageDecodeError, match="cut.png"):  # truncated: decoded now, not later in a transform
        decode_image(cut)


def _coco(root: Path, files: dict, sizes: dict) -> Path:
    ann = root / "instances.json"
    images = [{"id": i + 1, "file_name": p.name, "width": sizes[k][0], "height": sizes[k][1]}
              for i, (k, p) in enumerate(files.items())]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 3, 8, 6], "area": 48, "iscrowd": 0}
            for i in range(len(files))]
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return ann


def test_every_path_sees_the_same_pixels(tmp_path):
    """Training/eval input, predictor preprocessing, int8 calibration, export verification photos, detection
    and segmentation datasets and detect/segment predict all read each odd image identically."""
    from cpubone.engines.verify import photo_inputs
    from cpubone.preprocess import PreprocessConfig, preprocess
    from cpubone.engines.onnx_quantize import _ImageReader
    from cpubone.downstream.datasets import CocoDetection, SegmentationFolder
    from cpubone.downstream.api import _read_image
    from cpubone.train.data import SafeImageFolder

    files = _odd_images(tmp_path / "train" / "odd")  # an ImageFolder class folder
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    seg_images = tmp_path / "images" / "training"
    seg_images.mkdir(parents=True)
    for p in files.values():
        shutil.copyfile(p, seg_images / p.name)
        Image.new("L", (W, H), 1).save(tmp_path / "annotations" / "training" / f"{p.stem}.png")
    expected = {p.name: np.asarray(decode_image(p)) for p in files.values()}

    # the eval preprocessing at the image's own size keeps every pixel: invert the normalization
    cfg = PreprocessConfig(input_size=(3, H, W), crop_pct=1.0, crop_mode="squash")
    mean, std = np.asarray(cfg.mean, np.float32)[:, None, None], np.asarray(cfg.std, np.float32)[:, None, None]

    def pixels(x: np.ndarray) -> np.ndarray:
        return np.rint((x * std + mean) * 255).astype(np.uint8).transpose(1, 2, 0)

    seen = {name: {} for name in expected}
    folder = SafeImageFolder(tmp_path / "train", transform=np.asarray)  # what timm's transforms receive
    for i, (path, _) in enumerate(folder.samples):
        seen[Path(path).name]["train/eval"] = folder[i][0]
    for p in files.values():
        seen[p.name]["predict"] = pixels(preprocess(p, cfg))
        seen[p.name]["detect/segment predict"] = _read_image(p).permute(1, 2, 0).numpy()
    reader = _ImageReader(list(files.values()), cfg, "input")
    assert not reader.skipped
    for p, batch in zip(files.values(), reader.batches):
        seen[p.name]["int8 calibration"] = pixels(batch["input"][0])
    for (label, x), p in zip(photo_inputs(cfg, [(p.name, p) for p in files.values()]), files.values()):
        assert label == f"photo {p.name}"
        seen[p.name]["export verification"] = pixels(x[0])
    coco = CocoDetection(tmp_path / "train" / "odd", _coco(tmp_path, files, {k: (W, H) for k in files}))
    for i in range(len(coco)):
        seen[coco.coco.imgs[coco.ids[i]]["file_name"]]["detection"] = coco[i][0].permute(1, 2, 0).numpy()
    seg = SegmentationFolder(tmp_path, "training", num_classes=2)
    for i, (path, _) in enumerate(seg.samples):
        seen[path.name]["segmentation"] = seg[i][0].permute(1, 2, 0).numpy()

    paths = {"train/eval", "predict", "detect/segment predict", "int8 calibration", "export verification",
             "detection", "segmentation"}
    for name, arrays in seen.items():
        assert set(arrays) == paths, name
        for where, arr in arrays.items():
            assert arr.shape == (H, W, 3) and (arr == expected[name]).all(), f"{name} via {where}"


def test_annotation_size_is_checked_in_the_upright_frame(tmp_path):
    from cpubone.downstream.datasets import AnnotationError, CocoDetection

    files = {k: p for k, p in _odd_images(tmp_path / "img").items() if k in ("exif_rotated", "gray")}
    ok = CocoDetection(tmp_path / "img", _coco(tmp_path, files, {k: (W, H) for k in files}))
    assert all(ok[i][0].shape == (3, H, W) for i in range(len(ok)))
    # an annotation made on the stored (sideways) grid of the tagged photo is refused, naming the tag
    stored = CocoDetection(tmp_path / "img", _coco(tmp_path, files, {"exif_rotated": (H, W), "gray": (W, H)}))
    with pytest.raises(AnnotationError, match=r"16x24 but image exif_rotated.jpg is 24x16 after applying its "
                                              r"EXIF orientation \(tag 6\)"):
        [stored[i] for i in range(len(stored))]


def test_unreadable_images_are_skipped_and_counted_by_every_dataset(tmp_path):
    from cpubone.preprocess import PreprocessConfig
    from cpubone.engines.onnx_quantize import _ImageReader
    from cpubone.downstream.datasets import AnnotationError, CocoDetection, SegmentationFolder, collate_skip

    img_dir, ann_dir = tmp_path / "images" / "training", tmp_path / "annotations" / "training"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    Image.fromarray(_gradient()).save(img_dir / "good.png")
    (img_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    for stem in ("good", "bad"):
        Image.new("L", (W, H), 1).save(ann_dir / f"{stem}.png")
    files = {"good": img_dir / "good.png", "bad": img_dir / "bad.png"}
    reader = _ImageReader(list(files.values()), PreprocessConfig(input_size=(3, H, W)), "input")
    assert len(reader.batches) == 1 and len(reader.skipped) == 1 and "bad.png" in reader.skipped[0]
    coco = CocoDetection(img_dir, _coco(tmp_path, files, {k: (W, H) for k in files}))
    seg = SegmentationFolder(tmp_path, "training", num_classes=2)
    for ds in (coco, seg):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, _, skipped = collate_skip([ds[i] for i in range(len(ds))])
        assert skipped == 1 and any("bad.png: not a readable image" in str(w.message) for w in caught)
    # a corrupt mask is an annotation error naming the file, not a raw Pillow traceback
    (ann_dir / "good.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(AnnotationError, match="good.png: not a readable image"):
        seg.read_mask([s[0].name for s in seg.samples].index("good.png"))
