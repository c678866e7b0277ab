"""ImageFolder data: bad images skipped and counted, colour modes converted, clear errors, resumable order."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpubone.images import decode_image
from cpubone.train.data import (
    ResumableSampler,
    SafeImageFolder,
    collate_skip_bad,
    make_loader,
    write_digits_imagefolder,
)


def _img(path: Path, mode: str, size=(12, 10), color=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "CMYK":
        Image.new("CMYK", size, color or (0, 255, 255, 0)).save(path.with_suffix(".jpg"))
        return path.with_suffix(".jpg")
    Image.new(mode, size, color if color is not None else 128).save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "train"
    _img(root / "a" / "gray.png", "L", color=200)
    _img(root / "a" / "rgba.png", "RGBA", color=(255, 0, 0, 0))  # fully transparent red
    _img(root / "a" / "rgb.png", "RGB", color=(1, 2, 3))
    _img(root / "b" / "cmyk", "CMYK")
    _img(root / "b" / "pal.png", "P", color=3)
    (root / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = _img(root / "b" / "trunc_src.png", "RGB", size=(64, 64), color=(9, 9, 9))
    data = good.read_bytes()
    (root / "b" / "truncated.png").write_bytes(data[: len(data) // 2])
    good.unlink()
    (root / "b" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def test_modes_are_converted_to_rgb(mixed_folder):
    # SafeImageFolder reads with cpubone.images.decode_image (all its rules: tests/test_images.py)
    gray = decode_image(str(mixed_folder / "a" / "gray.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (200, 200, 200)
    # transparent pixels composite on white rather than exposing their hidden colour
    assert decode_image(str(mixed_folder / "a" / "rgba.png")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_image(str(mixed_folder / "b" / "cmyk.jpg"))
    r, g, b = cmyk.getpixel((0, 0))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # C=0 M=Y=255 is red
    assert decode_image(str(mixed_folder / "b" / "pal.png")).mode == "RGB"


def test_16bit_grayscale_is_rescaled(tmp_path):
    arr = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    (tmp_path / "c").mkdir()
    Image.fromarray(arr).save(tmp_path / "c" / "deep.png")
    img = SafeImageFolder(tmp_path, transform=np.asarray)[0][0]
    # the fixed 16 -> 8 bit scale (high byte), neither clipped at 255 nor stretched to the image's range
    assert img.shape == (4, 4, 3) and (img[..., 0] == arr >> 8).all() and img.max() == 60000 >> 8


def test_corrupt_images_are_skipped_and_counted(mixed_folder, caplog):
    import torchvision.transforms as T

    ds = SafeImageFolder(mixed_folder, transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    assert ds.classes == ["a", "b"] and len(ds) == 7  # the .txt is not an image
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert sum(b.skipped for b in batches) == 2
    assert sum(len(b.targets) for b in batches) == 5
    assert all(b.images.shape[1:] == (3, 8, 8) for b in batches)
    assert sorted(Path(p).name for p in ds.bad_files) == ["corrupt.png", "truncated.png"]
    assert "corrupt.png" in caplog.text
    # counted in the main process even when worker processes did the reading
    workers = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad, num_workers=2)
    assert sum(b.skipped for b in workers) == 2


def test_all_bad_batch_is_empty_not_a_crash():
    b = collate_skip_bad([None, None])
    assert b.skipped == 2 and b.targets.numel() == 0


def test_empty_class_folder_error_names_it(tmp_path):
    _img(tmp_path / "train" / "cat" / "x.png", "RGB")
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"empty class folder.*train/dog"):
        SafeImageFolder(tmp_path / "train")


def test_empty_dataset_and_missing_folder_errors(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"empty dataset: .*train has no class folders"):
        SafeImageFolder(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="nope"):
        SafeImageFolder(tmp_path / "nope")


def test_val_classes_follow_train_order(tmp_path):
    _img(tmp_path / "val" / "b" / "x.png", "RGB")
    ds = SafeImageFolder(tmp_path / "val", classes=["a", "b"])
    assert ds.samples[0][1] == 1
    with pytest.raises(ValueError, match="not in the training classes: c"):
        _img(tmp_path / "val" / "c" / "y.png", "RGB")
        SafeImageFolder(tmp_path / "val", classes=["a", "b"])


def test_resumable_sampler_skips_seen_samples_and_splits_like_one_process():
    data = list(range(20))
    full = ResumableSampler(data, 1, 0, seed=3)
    full.set_epoch(2)
    order = list(full)
    full.set_start(8)
    assert list(full) == order[8:] and len(full) == 12
    ranks = [ResumableSampler(data, 2, r, seed=3, drop_last=True) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    r0, r1 = list(ranks[0]), list(ranks[1])
    # per-rank batches of 2 together form the single-process batch of 4
    assert sorted(r0[:2] + r1[:2]) == sorted(order[:4])


def test_loader_does_not_touch_global_rng(tmp_path):
    _img(tmp_path / "c" / "x.png", "RGB")
    ds = SafeImageFolder(tmp_path)
    loader = make_loader(ds, 1, None, 0, drop_last=False)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    iter(loader)
    assert torch.equal(before, torch.get_rng_state())


def test_digits_imagefolder(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits", size=16)
    train = SafeImageFolder(root / "train")
    val = SafeImageFolder(root / "val")
    assert train.classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797 and len(val) == 360
    img = Image.open(train.samples[0][0])
    assert img.size == (16, 16) and img.mode == "L"
