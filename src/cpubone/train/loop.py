"""The training loop shared by classification, detection and segmentation.

``run(task, output)`` trains any ``Task``: the task supplies the model, optimizer, scheduler, data, the loss
of a micro-batch and the evaluation; this module owns everything around them, once:

* one process or many (torchrun: DDP over gloo on CPU, NCCL on GPU), gradient accumulation, clipping, AMP
  (bf16 autocast on CPU and GPU, fp16 + GradScaler on GPU), EMA (timm's ``ModelEmaV3``);
* checkpoints holding the full state (model, EMA, optimizer, scheduler, AMP scaler, progress, the RNG
  states of every rank, the task's config as JSON), written atomically every ``checkpoint_every`` steps and
  at each epoch end. ``last.pt`` is written last: whatever an epoch derives (``best.pt``, the task's exported
  weights) is on disk before the epoch counts as done, and ``run`` rebuilds it on resume if it is missing;
* exact resume after SIGKILL: the task's data order depends only on (seed, epoch), a resumed epoch skips
  what was seen, and the RNG streams are restored after the data iterator is created;
* a NaN/inf loss stops every rank before the weights or checkpoints are touched (``TrainingDiverged``);
* restart from the best checkpoint when the metric falls ``restart_drop`` below the best;
* tqdm progress bars, ``train.log``, ``history.csv`` / ``metrics.jsonl``, TensorBoard and ``curves.png``.

The loop itself is plain on purpose (nanoGPT's train.py is the model): ``run`` sets up, restores, and then
for each epoch calls ``_train_epoch`` and ``_end_epoch``. Considered and not used: Lightning Fabric and
HF Accelerate would remove the DDP / autocast plumbing (about 40 lines here) but add a dependency and their
own checkpoint and launcher conventions, and the exact-resume guarantee needs control of the RNG streams
and the data order that they do not give.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3, dispatch_clip_grad
from tqdm import tqdm

from ..models.checkpoints import CheckpointError, atomic_torch_save

__all__ = [
    "Task",
    "Dist",
    "EngineState",
    "TrainingDiverged",
    "run",
    "init_distributed",
    "all_sum",
    "amp_dtype",
    "load_training_state",
    "save_training_state",
    "resolve_checkpoint",
    "plot_curves",
    "CKPT_LAST",
    "CKPT_BEST",
]

CKPT_LAST = "last.pt"
CKPT_BEST = "best.pt"
HISTORY_CSV = "history.csv"
HISTORY_JSONL = "metrics.jsonl"
CURVES_PNG = "curves.png"
# a test hook: SIGKILL this process at a named point of the end-of-epoch writes (see tests/test_train_resume.py)
FAULT_ENV = "CPUBONE_TEST_KILL_AT"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


def _fault(point: str, epoch: int) -> None:
    if os.environ.get(FAULT_ENV) in (point, f"{point}@{epoch}"):
        os.kill(os.getpid(), signal.SIGKILL)


# --- distributed ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group if world > 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_sum(values: List[float], d: Dist) -> List[float]:
    """Element-wise sum over ranks (identity on one process)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for an AMP mode: auto (bf16; fp16 on GPUs without bf16), bf16, fp16 (CUDA) or none."""
    amp = amp.lower()
    if amp in ("none", "fp32", "off", "false"):
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp fp16 needs CUDA (on CPU use bf16 or none)")
        return torch.float16
    raise ValueError(f"unknown amp mode {amp!r}: use auto, bf16, fp16 or none")


# --- RNG state (as tensors so that torch.load(weights_only=True) can read it back) -----------------
def _rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with its own seeded python/numpy/torch RNG streams, leaving the training streams as they were."""
    saved = _rng_state()
    seed_all(seed)
    try:
        yield
    finally:
        _set_rng_state(saved)


# --- checkpoints ---------------------------------------------------------------------------------
def save_training_state(state: Dict[str, Any], path: os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a kill at any
    moment leaves either the old or the new file, never a torn one."""
    atomic_torch_save(state, path)


def resolve_checkpoint(path: os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        if (path / CKPT_LAST).is_file():
            return path / CKPT_LAST
        raise FileNotFoundError(f"{path} is a folder without {CKPT_LAST}: pass a run folder or a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    return path


def load_training_state(path: os.PathLike) -> Dict[str, Any]:
    """Read a training checkpoint (or a run folder's ``last.pt``) without executing pickled code."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "not readable"
        raise CheckpointError(f"{path}: cannot read the training checkpoint: {type(e).__name__}: {e}") from e
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "config")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a cpubone training checkpoint (missing {', '.join(missing)})")
    return state


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- the task interface --------------------------------------------------------------------------
class Task:
    """What a task gives the loop. ``setup`` must set the attributes below; the methods are called by ``run``.

    A micro-batch is whatever ``batches`` yields; ``batches`` yields ``(batch, skipped)`` pairs, ``batch`` None
    when every sample of it was unreadable. ``batches`` must create its data iterator before returning (the
    loop restores RNG streams right after) and depend only on (seed, epoch, start_step).
    """

    name = "task"
    x_key = "epoch"  # the x axis of the curves
    curve_keys: Tuple[str, ...] = ()  # metrics plotted beside the loss

    # set by setup()
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler (step_update(num_updates))
    epochs: int
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    amp: str = "none"
    ema_decay: float = 0.0
    ema_warmup: bool = False
    restart_drop: Optional[float] = None
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool = False
    log_every: int = 50
    title: str = ""

    def setup(self, d: Dist, log) -> None:
        raise NotImplementedError

    def steps_in_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, start_step: int) -> Iterator[Tuple[Any, int]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, ema: Optional[nn.Module], progress: float) -> Tuple[torch.Tensor, int]:
        """(mean loss, samples) of one micro-batch, under autocast."""
        raise NotImplementedError

    def after_update(self, progress: float) -> None:
        """Called after every optimizer step with training progress in [0, 1] (e.g. scheduled DropPath)."""

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int) -> Tuple[Dict[str, Any], Optional[float], str]:
        """(metrics for the history row, the metric that picks the best epoch or None, 'model'/'ema')."""
        return {}, None, "model"

    def save_derived(self, out: Path, best: Optional[nn.Module], state: Dict[str, Any], final: bool) -> None:
        """Write what an epoch derives (rank 0, before ``last.pt``): ``best`` is the new best module or None."""

    def rebuild_derived(self, out: Path, last: Dict[str, Any]) -> None:
        """On resume: recreate derived files that a kill may have left missing or half-written."""

    def config(self) -> Dict[str, Any]:
        return {}

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def describe(self, d: Dist) -> List[str]:
        return []

    def diverged_hint(self) -> str:
        return "lower the learning rate, clip the gradients or turn AMP off, then resume from it"


@dataclass
class EngineState:
    """Progress of a run (stored in every checkpoint)."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: int = -1
    best_weights: str = "model"
    epoch_loss: float = 0.0
    epoch_seen: int = 0
    skipped: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)

    def to_checkpoint(self) -> Dict[str, Any]:
        s = asdict(self)
        s["history"] = json.dumps(self.history)
        return s

    @classmethod
    def from_checkpoint(cls, s: Dict[str, Any]) -> "EngineState":
        st = cls(epoch=s["epoch"], step_in_epoch=s["step_in_epoch"], global_step=s["global_step"])
        for k in ("best_metric", "best_epoch", "best_weights", "epoch_loss", "epoch_seen", "skipped"):
            if k in s:
                setattr(st, k, s[k])
        st.history = json.loads(s.get("history", "[]"))
        return st


# --- visibility ----------------------------------------------------------------------------------
class _Log:
    """Rank-0 log lines to stdout (through tqdm so bars are not broken) and appended to ``train.log``."""

    def __init__(self, out: Path, enabled: bool, fn: Optional[Callable[[str], None]] = None) -> None:
        self.enabled, self.fn = enabled, fn
        self.path = out / "train.log"

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.fn is not None:
            self.fn(msg)
        else:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def _write_history(history: List[Dict[str, Any]], out: Path) -> None:
    if not history:
        return
    keys: List[str] = []
    for row in history:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]
    tmp = out / f".{HISTORY_CSV}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in keys})
    os.replace(tmp, out / HISTORY_CSV)
    tmp = out / f".{HISTORY_JSONL}.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, out / HISTORY_JSONL)


def plot_curves(history: List[Dict[str, Any]], path: os.PathLike, title: str = "", x_key: str = "epoch",
                metric_keys: Tuple[str, ...] = ("val_top1", "ema_top1")) -> Path:
    """PNG of the train (and val) loss and the given metrics over ``x_key``."""
    import matplotlib  # optional: pip install 'cpubone[train]'

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [h[x_key] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") not in (None, "") for h in history):
        ax1.plot(xs, [h.get("val_loss") for h in history], "o-", label="val")
    ax1.set_xlabel(x_key.replace("_", " ")), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    for key in metric_keys:
        vals = [h.get(key) for h in history]
        if any(isinstance(v, (int, float)) for v in vals):
            ax2.plot(xs, [v if isinstance(v, (int, float)) else float("nan") for v in vals], "o-",
                     label=key.replace("_", " "))
    ax2.set_xlabel(x_key.replace("_", " ")), ax2.set_ylabel("metric"), ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --- the loop ------------------------------------------------------------------------------------
class _Run:
    """What one run holds while it trains: the task, the wrapped model, EMA, scaler, state, logs."""

    def __init__(self, task: Task, d: Dist, out: Path, log: _Log) -> None:
        self.task, self.d, self.out, self.log = task, d, out, log
        self.unwrapped = task.model
        self.model: nn.Module = task.model
        if d.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                task.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.amp_dtype = amp_dtype(task.amp, d.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema = None
        if task.ema_decay > 0:
            self.ema = ModelEmaV3(task.model, decay=task.ema_decay, use_warmup=task.ema_warmup)
        self.trainable = [p for p in task.model.parameters() if p.requires_grad]
        self.state = EngineState()
        self.total_steps = sum(task.steps_in_epoch(e) for e in range(task.epochs))
        self.writer = None

    # checkpoints -------------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        """The full state; every rank must call it (the RNG states are gathered)."""
        rngs = [_rng_state()]
        if self.d.world > 1:
            gathered: List[Any] = [None] * self.d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        s: Dict[str, Any] = dict(model=self.unwrapped.state_dict(), optimizer=self.task.optimizer.state_dict(),
                                 scheduler=self.task.scheduler.state_dict(), rng=rngs, task=self.task.name,
                                 config=json.dumps(self.task.config()), **self.state.to_checkpoint(),
                                 **self.task.extra_state())
        if self.ema is not None:
            s["ema"] = self.ema.module.state_dict()
        if self.scaler is not None:
            s["scaler"] = self.scaler.state_dict()
        return s

    def checked_snapshot(self) -> Dict[str, Any]:
        if not _all_finite(self.unwrapped):
            raise TrainingDiverged(f"non-finite weights after global step {self.state.global_step}; not saving. "
                                   f"The last good checkpoint is {self.out / CKPT_LAST}.")
        return self.snapshot()

    def restore(self, s: Dict[str, Any], with_progress: bool = True) -> None:
        """Weights, EMA and optimizer from checkpoint ``s``; with ``with_progress`` also schedule and progress."""
        self.unwrapped.load_state_dict(s["model"])
        if self.ema is not None and "ema" in s:
            self.ema.module.load_state_dict(s["ema"])
        self.task.optimizer.load_state_dict(s["optimizer"])
        if not with_progress:
            return
        self.task.scheduler.load_state_dict(s["scheduler"])
        if self.scaler is not None and "scaler" in s:
            self.scaler.load_state_dict(s["scaler"])
        self.state = EngineState.from_checkpoint(s)

    # one epoch ---------------------------------------------------------------------------------
    def diverged(self, value: float, epoch: int) -> TrainingDiverged:
        last = self.out / CKPT_LAST
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint had been written yet"
        return TrainingDiverged(
            f"loss is {value} at epoch {epoch + 1}, global step {self.state.global_step + 1} (lr "
            f"{self.task.optimizer.param_groups[0]['lr']:.3g}): training stopped; {kept}. "
            f"To go on, {self.task.diverged_hint()}.")

    def micro_step(self, batch: Any, last_micro: bool, epoch: int) -> Tuple[float, int, int]:
        t, st, d = self.task, self.state, self.d
        no_sync = d.world > 1 and not last_micro
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            batch, skipped = batch
            if batch is None:
                # every sample of this micro-batch was unreadable: a zero loss still joins the all-reduce
                loss, value, n = sum(p.sum() * 0.0 for p in self.trainable), 0.0, 0
            else:
                with torch.autocast(d.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, n = t.loss(self.model, batch, self.ema.module if self.ema is not None else None,
                                     st.global_step / max(self.total_steps, 1))
                value = float(loss.detach())
            # one collective per micro-batch: all ranks stop together, skipped samples are summed
            bad, skipped_all = all_sum([0.0 if math.isfinite(value) else 1.0, float(skipped)], d)
            st.skipped += int(skipped_all)
            if bad:
                raise self.diverged(value, epoch)
            scaled = loss / t.accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return value * n, n, int(skipped_all)

    def optimizer_step(self) -> None:
        t = self.task
        if t.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(t.optimizer)
            dispatch_clip_grad(self.trainable, t.clip_grad)
        if self.scaler is not None:
            self.scaler.step(t.optimizer)
            self.scaler.update()
        else:
            t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        t.scheduler.step_update(num_updates=self.state.global_step)
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=self.state.global_step)
        t.after_update(self.state.global_step / max(self.total_steps, 1))

    def train_epoch(self, epoch: int, batches: Iterator[Tuple[Any, int]]) -> int:
        """Optimizer steps of one epoch from ``state.step_in_epoch`` on; returns the samples seen now."""
        t, st = self.task, self.state
        steps = t.steps_in_epoch(epoch)
        seen_now = 0
        bar = tqdm(total=steps, initial=st.step_in_epoch, desc=f"{t.name} epoch {epoch + 1}/{t.epochs}",
                   disable=not (self.d.main and t.progress), dynamic_ncols=True, leave=False, file=sys.stderr)
        for step in range(st.step_in_epoch, steps):
            step_loss, step_n = 0.0, 0
            for micro_i in range(t.accum_steps):
                loss_sum, n, _ = self.micro_step(next(batches), micro_i == t.accum_steps - 1, epoch)
                step_loss += loss_sum
                step_n += n
            self.optimizer_step()
            st.step_in_epoch = step + 1
            st.epoch_loss += step_loss
            st.epoch_seen += step_n
            seen_now += step_n
            mean, lr = step_loss / max(step_n, 1), t.optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            if t.log_every and st.global_step % t.log_every == 0:
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", mean, st.global_step)
                    self.writer.add_scalar("train/lr", lr, st.global_step)
                if not t.progress:
                    self.log(f"epoch {epoch + 1} step {step + 1}/{steps} global_step {st.global_step} "
                             f"loss {mean:.4f} lr {lr:.3g}")
            if t.checkpoint_every and st.global_step % t.checkpoint_every == 0 and step + 1 < steps:
                s = self.checked_snapshot()
                if self.d.main:
                    save_training_state(s, self.out / CKPT_LAST)
                self.log(f"checkpoint: global step {st.global_step} -> {self.out / CKPT_LAST}")
        bar.close()
        return seen_now

    def end_epoch(self, epoch: int, seconds: float, seen_now: int) -> Dict[str, Any]:
        """Evaluate, maybe restart from the best, record, and write best / derived files, then ``last.pt``."""
        t, st, d = self.task, self.state, self.d
        loss_sum, seen = all_sum([st.epoch_loss, float(st.epoch_seen)], d)
        row: Dict[str, Any] = dict(epoch=epoch + 1, global_step=st.global_step, train_loss=loss_sum / max(seen, 1.0),
                                   lr=t.optimizer.param_groups[0]["lr"])
        metrics, metric, which = t.evaluate(self.unwrapped, self.ema.module if self.ema is not None else None, epoch)
        row.update(metrics)
        row.update(epoch_time_s=seconds, images_per_s=all_sum([float(seen_now)], d)[0] / max(seconds, 1e-9),
                   skipped_images=st.skipped)
        restart = (t.restart_drop is not None and metric is not None and st.best_epoch > 0
                   and metric < st.best_metric - t.restart_drop and (self.out / CKPT_BEST).is_file())
        is_best = metric is not None and metric > st.best_metric
        if restart:
            # the run fell off: continue from the best weights, optimizer and EMA at the current schedule
            self.restore(load_training_state(self.out / CKPT_BEST), with_progress=False)
            row["restarted_from_epoch"] = st.best_epoch
            self.log(f"epoch {epoch + 1}: {metric:.2f} is more than {t.restart_drop} below the best {st.best_metric:.2f} "
                     f"(epoch {st.best_epoch}): reloaded the best checkpoint and continue")
        elif is_best:
            st.best_metric, st.best_epoch, st.best_weights = float(metric), epoch + 1, which
        st.history.append(row)
        st.epoch, st.step_in_epoch, st.epoch_loss, st.epoch_seen = epoch + 1, 0, 0.0, 0
        s = self.checked_snapshot()
        final = epoch + 1 == t.epochs
        if d.main:
            # derived files first: the epoch only counts as done once last.pt says so
            if is_best and not restart:
                save_training_state(s, self.out / CKPT_BEST)
            best_module = None
            if is_best and not restart:
                best_module = self.ema.module if which == "ema" and self.ema is not None else self.unwrapped
            t.save_derived(self.out, best_module, s, final)
            _fault("before-last", epoch + 1)
            save_training_state(s, self.out / CKPT_LAST)
            _fault("after-last", epoch + 1)
            _write_history(st.history, self.out)
            if self.writer is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        self.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                self.writer.flush()
        return row


def run(task: Task, output: os.PathLike, resume: Optional[Dict[str, Any]] = None, resume_path: str = "",
        device: str = "auto", seed: int = 0, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train ``task`` (from ``resume``, a loaded checkpoint, if given); returns the run's summary fields.

    ``log`` receives the first process's log lines (default: printed); they also go to ``train.log``.
    Raises ``TrainingDiverged`` on a NaN/inf loss (``last.pt`` is left as it was).
    """
    d = init_distributed(device)
    try:
        return _run(task, Path(output), resume, resume_path, d, seed, log)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(task: Task, out: Path, resume: Optional[Dict[str, Any]], resume_path: str, d: Dist,
         seed: int, log_fn: Optional[Callable[[str], None]]) -> Dict[str, Any]:
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp*"):  # half-written files of a killed run; the real ones are intact
            stale.unlink()
    if d.world > 1:
        dist.barrier()
    log = _Log(out, d.main, log_fn)
    task.setup(d, log)
    r = _Run(task, d, out, log)

    rng_to_restore = None
    if resume is not None:
        r.restore(resume)
        rngs = resume.get("rng", [])
        rng_to_restore = rngs[d.rank] if len(rngs) == d.world else None
        st = r.state
        log(f"resumed from {resume_path}: epoch {st.epoch + 1}, step {st.step_in_epoch}/"
            f"{task.steps_in_epoch(min(st.epoch, task.epochs - 1))} of the epoch, global step {st.global_step}")
        if rng_to_restore is None:
            log(f"  (saved with {len(rngs)} process(es), now {d.world}: RNG streams restart from the seed)")
            seed_all(seed + d.rank + 1000003 * st.global_step)
        if d.main:
            task.rebuild_derived(out, resume)
    else:
        for line in task.describe(d):
            log(line)
    if d.main and task.tensorboard:
        # optional: the tensorboard package (pip install 'cpubone[train]')
        from torch.utils.tensorboard import SummaryWriter

        r.writer = SummaryWriter(str(out / "tensorboard"), purge_step=r.state.global_step or None)

    t_start = time.time()
    try:
        for epoch in range(r.state.epoch, task.epochs):
            r.model.train()  # before the task's batches(), which may put parts back in eval mode
            batches = task.batches(epoch, r.state.step_in_epoch)
            if rng_to_restore is not None:
                _set_rng_state(rng_to_restore)  # after the iterator exists: creating it must not shift the streams
                rng_to_restore = None
            t_epoch = time.time()
            seen_now = r.train_epoch(epoch, batches)
            row = r.end_epoch(epoch, time.time() - t_epoch, seen_now)
            log(_epoch_line(task, row))
    finally:
        if d.main and r.state.history:
            plot_curves(r.state.history, out / CURVES_PNG, title=task.title, x_key=task.x_key,
                        metric_keys=task.curve_keys)
            _write_history(r.state.history, out)
        if r.writer is not None:
            r.writer.close()
    st = r.state
    last = st.history[-1] if st.history else {}
    return dict(epochs=task.epochs, global_steps=st.global_step, processes=d.world, device=str(d.device),
                wall_time_s=time.time() - t_start, best_metric=st.best_metric if st.best_epoch > 0 else None,
                best_epoch=st.best_epoch if st.best_epoch > 0 else None, skipped_images=st.skipped, last=last,
                history=st.history, output=str(out), last_checkpoint=str(out / CKPT_LAST), main=d.main)


def _epoch_line(task: Task, row: Dict[str, Any]) -> str:
    parts = [f"{task.name} epoch {row['epoch']}/{task.epochs}", f"step {row['global_step']}",
             f"train loss {row['train_loss']:.4f}"]
    for k, v in row.items():
        if k in ("epoch", "global_step", "train_loss", "lr", "epoch_time_s", "images_per_s") or isinstance(v, (list, dict)):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    parts.append(f"{row['epoch_time_s']:.1f} s  {row['images_per_s']:.0f} img/s")
    return "  ".join(parts)
