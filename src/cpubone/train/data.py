"""Data for training and evaluation: ImageFolder splits that survive bad images, timm transforms, loaders.

The layout is torchvision's ImageFolder, one folder per class, under ``train/`` and ``val/``::

    DATA/train/<class>/<image>    DATA/val/<class>/<image>

Unreadable or corrupt files are skipped and counted rather than crashing a run that may have been
going for days: the dataset returns ``None`` for them and ``collate_skip_bad`` drops those samples and
reports how many it dropped, so the count reaches the main process even from worker processes.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder

from ..images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image

__all__ = [
    "SafeImageFolder",
    "collate_skip_bad",
    "ResumableSampler",
    "build_transforms",
    "make_loader",
    "write_digits_imagefolder",
    "StreamSampler",
    "SeededSamples",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class SafeImageFolder(Dataset):
    """An ImageFolder split whose bad images are skipped and counted instead of crashing.

    Args:
        root: the split folder (e.g. ``DATA/train``), one sub-folder per class.
        transform: applied to the RGB PIL image from ``cpubone.images.decode_image`` (the decoder every
            other path uses too).
        classes: class names that fix the label order (pass the train split's to ``val`` so the labels
            agree even if ``val`` lacks a class).

    ``__getitem__`` returns ``(image, label)``, or ``None`` for an unreadable image (use
    ``collate_skip_bad``). ``bad_files`` lists the paths this process failed to read.
    """

    def __init__(self, root: PathLike, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise ValueError(f"empty dataset: {root} has no class folders (expected {root}/<class>/<image>)")
        exts = IMAGE_EXTENSIONS
        empty = [c for c in found if not any(
            f.lower().endswith(exts) for _, _, files in os.walk(root / c, followlinks=True) for f in files)]
        if empty:
            names = ", ".join(str(root / c) for c in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            raise ValueError(f"{len(empty)} empty class folder(s) without images ({', '.join(exts)}): {names}")
        self.classes: List[str] = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{root}: class folders not in the training classes: {', '.join(unknown[:10])}")
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        # torchvision does the walking; classes=None above already checked that every folder has files
        folder = ImageFolder(str(root), loader=lambda p: p, allow_empty=True,
                             is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
        self.samples: List[Tuple[str, int]] = [(p, self.class_to_idx[folder.classes[t]]) for p, t in folder.samples]
        if not self.samples:
            raise ValueError(f"empty dataset: no images under {root}")
        self.targets = [t for _, t in self.samples]
        self.root = root
        self.transform = transform
        self.size_transforms: Dict[int, Callable] = {}  # random-resolution training: one transform per size
        self.bad_files: List[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> Optional[Tuple[Any, int]]:
        transform = self.transform
        if isinstance(index, tuple):  # (index, size) from RandomResolutionBatchSampler
            index, size = index
            transform = self.size_transforms[size]
        path, target = self.samples[index]
        try:
            img = decode_image(path)
        except (ImageDecodeError, FileNotFoundError) as e:  # FileNotFoundError: deleted since the listing
            self.bad_files.append(path)
            _logger.warning("skipping unreadable image: %s", e)  # the message names the file
            return None
        if transform is not None:
            img = transform(img)
        return img, target


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    skipped: int  # unreadable images dropped from this batch


def collate_skip_bad(items: List[Optional[Tuple[torch.Tensor, int]]]) -> Batch:
    """Stack the readable samples of a batch and count the unreadable ones (``None``)."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([g[0] for g in good])
    targets = torch.tensor([g[1] for g in good], dtype=torch.long)
    return Batch(images, targets, skipped)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also used for one process) that can start part-way through an epoch.

    The order depends only on (seed, epoch), and the same permutation is split over ranks, so a run
    resumed mid-epoch sees exactly the samples the interrupted run had not reached yet, and N ranks
    together see the same global batches as one process.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` samples of this rank's order for the current epoch only."""
        self.start_index = index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start_index:]
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class StreamSampler(torch.utils.data.Sampler):
    """This rank's share of ``samples`` indices for one epoch, resumable part-way through.

    The epoch's indices are whole random permutations of the dataset, concatenated until there are
    ``samples`` of them, from a generator seeded by (seed, epoch) only; rank r takes every world-th one
    starting at r, so N ranks together see the same global batches as one process. ``set_start`` skips
    the first indices of this rank's share (a resumed epoch).
    """

    def __init__(self, num_items: int, samples: int, world: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.num_items, self.samples, self.world, self.rank, self.seed = num_items, samples, world, rank, seed
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch: int, samples: Optional[int] = None) -> None:
        self.epoch = epoch
        if samples is not None:
            self.samples = samples

    def set_start(self, index: int) -> None:
        self.start_index = index

    def _indices(self) -> List[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        out: List[int] = []
        while len(out) < self.samples:
            out += torch.randperm(self.num_items, generator=g).tolist()
        return out[: self.samples][self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start_index:])

    def __len__(self) -> int:
        return len(range(self.rank, self.samples, self.world)) - self.start_index


class SeededSamples(Dataset):
    """A dataset whose random augmentation of item i in epoch e depends on (seed, e, i) only.

    Each item is drawn with python, numpy and torch RNGs seeded from (seed, epoch, index) and the
    caller's streams restored afterwards, so any number of processes and workers, and a resumed run,
    augment every sample exactly alike. Call ``set_epoch`` before creating the data iterator.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        s = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**62
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


def build_transforms(model: torch.nn.Module, img_size: int, recipe: Any, is_training: bool,
                     crop_pct: Optional[float] = None) -> Callable:
    """timm's train / eval transform for ``model`` at ``img_size`` (mean, std, interpolation from its cfg).

    ``recipe`` supplies the augmentation (``auto_augment``, ``scale``, ``hflip``, ``color_jitter``,
    ``re_prob``, ``no_aug``); the eval transform is the model's: resize to size / crop_pct, centre crop.
    """
    args: Dict[str, Any] = {"input_size": (3, img_size, img_size)}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    cfg = resolve_data_config(args, model=model)
    if not is_training:
        return create_transform(**cfg, is_training=False)
    return create_transform(
        cfg["input_size"], is_training=True, no_aug=recipe.no_aug, scale=tuple(recipe.scale),
        hflip=recipe.hflip, color_jitter=recipe.color_jitter, auto_augment=recipe.auto_augment,
        interpolation=recipe.train_interpolation or cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        re_prob=recipe.re_prob, re_mode="pixel", crop_pct=cfg["crop_pct"],
    )


def make_loader(dataset: Dataset, batch_size: int, sampler: Optional[torch.utils.data.Sampler], num_workers: int,
                drop_last: bool, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    # a private generator: creating the iterator must not draw from the global torch RNG, or a run
    # resumed mid-epoch would see different augmentations / DropPath masks than an uninterrupted one
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_bad, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=False, generator=generator)


def write_digits_imagefolder(root: PathLike, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's handwritten digits (1,797 real 8x8 scans) as an ImageFolder of PNGs.

    Images are upsampled to ``size`` px (bicubic) and saved as 8-bit grayscale under
    ``root/train/<digit>/`` and ``root/val/<digit>/``; the split is stratified and fixed by ``seed``.
    Returns ``root``.
    """
    # optional: scikit-learn (pip install 'cpubone[train]')
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # pixel values are 0..16
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    root = Path(root)
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in ids:
            folder = root / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC)
            img.save(folder / f"{i:04d}.png")
    return root
