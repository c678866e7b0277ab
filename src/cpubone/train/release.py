"""The pieces of the authors' release recipe that timm does not have.

* ``apply_scheduled_drop_path`` / ``set_drop_path_progress``: DropPath on the residual blocks with an
  identity shortcut, in module order, skipping the first ``skip``; block i of n gets rate x (i+1)/n, and
  the rate is multiplied by training progress (0 -> 1). timm's ``DropPath`` does the dropping (the kept
  branch divided by the keep probability); only its rate is set here.
* ``RandomResolutionBatchSampler``: one input size per batch from a list, the sequence drawn from a
  generator seeded with the epoch, so every process draws the same sizes.
* ``reestimate_batchnorm``: BatchNorm running statistics recomputed on training images before evaluating.
* ``mesa_loss``: Mesa self-distillation towards the EMA model once training progress reaches a threshold.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.data import Sampler

__all__ = ["residual_slots", "apply_scheduled_drop_path", "set_drop_path_progress", "RandomResolutionBatchSampler",
           "size_sequence", "reestimate_batchnorm", "mesa_loss"]

# attribute names of the stochastic-depth slots of our blocks, in the order the block applies them
_SLOTS = ("drop_path1", "drop_path2", "drop_path")


def residual_slots(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, attribute) of every residual branch with an identity shortcut, in module order.

    CPUBone's FusedMBConv / MBConv blocks with ``has_skip``, and the attention and MLP branches of each
    CPUBoneBlock (its local block follows as a module of its own), as the release's ResidualBlocks are.
    """
    slots = []
    for m in model.modules():
        for name in _SLOTS:
            if hasattr(m, name) and (name != "drop_path" or getattr(m, "has_skip", True)):
                slots.append((m, name))
    return slots


def apply_scheduled_drop_path(model: nn.Module, rate: float, skip: int = 0, linear: bool = True) -> List[nn.Module]:
    """Put a timm ``DropPath`` into every residual slot after the first ``skip``; returns them, each with its
    full rate in ``base_rate`` (block i of n: rate x (i+1)/n when ``linear``). Rates start at 0 (progress 0)."""
    slots = residual_slots(model)[skip:]
    n = len(slots)
    mods = []
    for i, (m, name) in enumerate(slots):
        dp = DropPath(0.0)
        dp.base_rate = rate * (i + 1) / n if linear else rate
        setattr(m, name, dp)
        mods.append(dp)
    return mods


def set_drop_path_progress(mods: Iterable[nn.Module], progress: float) -> None:
    """Scheduled DropPath: every rate is its full rate x training progress (clipped to [0, 1])."""
    p = min(max(progress, 0.0), 1.0)
    for m in mods:
        m.drop_prob = m.base_rate * p


def size_sequence(epoch: int, sizes: Sequence[int], batches: int) -> List[int]:
    """The input size of each of the ``batches`` batches of ``epoch``: the same on every process."""
    g = torch.Generator()
    g.manual_seed(epoch)
    return [int(sizes[i]) for i in torch.randint(len(sizes), (batches,), generator=g).tolist()]


class RandomResolutionBatchSampler(Sampler):
    """Batches of ``(index, size)`` with one size per batch (``size_sequence``); resumable mid-epoch.

    ``sampler`` is this process's ``ResumableSampler``; its ``start_index`` (a whole number of batches) also
    skips the sizes of the batches already seen. The dataset's ``__getitem__`` takes the pair.
    """

    def __init__(self, sampler, batch_size: int, sizes: Sequence[int]) -> None:
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, tuple(sizes)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        first = self.sampler.start_index // self.batch_size
        seq = size_sequence(self.sampler.epoch, self.sizes, self.sampler.num_samples // self.batch_size)
        batch: List[Tuple[int, int]] = []
        b = first
        for idx in self.sampler:
            batch.append((idx, seq[b]))
            if len(batch) == self.batch_size:
                yield batch
                batch, b = [], b + 1


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor], world: int = 1) -> int:
    """Recompute the running statistics of the trainable BatchNorms as plain averages over ``images``.

    Everything else runs in eval mode (no DropPath or dropout noise in the statistics). With several
    processes each sees its share and the statistics are averaged. Returns the images seen here.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and any(p.requires_grad for p in m.parameters(False))]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    n = 0
    for x in images:
        model(x)
        n += len(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    if world > 1:
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(world)
    return n


def mesa_loss(output: torch.Tensor, ema_output: Optional[torch.Tensor], progress: float, thresh: Optional[float],
              ratio: float) -> Optional[torch.Tensor]:
    """Mesa: ``ratio`` x BCE(output, sigmoid(EMA output)) once ``progress >= thresh``; None before (or off)."""
    if thresh is None or ema_output is None or progress < thresh or ratio == 0:
        return None
    return ratio * F.binary_cross_entropy_with_logits(output.float(), torch.sigmoid(ema_output.float().detach()))
