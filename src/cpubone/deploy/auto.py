"""``cpubone deploy``: the fastest verified way to run a model on this CPU, chosen for you.

Every installed engine x precision is prepared from the model's inference form, then

1. fp32 candidates must reproduce the PyTorch training form within the engine's tolerance on a random
   input and real photos (``cpubone.engines.verify.verify_fp32``), or they are rejected;
2. every candidate is compared with the training form on the evaluation images (``val`` if given, else
   the calibration images, else the scikit-image photos): it is kept when its top-1 agreement is at
   least ``min_agreement`` and, on a labelled folder, its accuracy drop at most ``max_drop`` points;
3. the kept candidates are timed side by side (interleaved rounds, batch 1, pinned threads) and the
   fastest is written to the output folder with its metadata (preprocessing, class names), a report
   (Markdown + JSON + plot) and the command that runs it.

Low precision can only be judged on a trained model: with random weights every image gets the same
class, so agreement is meaningless (the report says which weights were used).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..engines import (
    PRECISIONS,
    MissingExtraError,
    engine_class,
    engine_names,
    get_engine,
)
from ..engines.timing import LatencyResult, time_interleaved
from ..engines.verify import (
    Agreement,
    EngineVerificationError,
    agreement,
    torch_reference,
    verification_inputs,
    verify_fp32,
)
from ..images import list_images
from ..preprocess import PreprocessConfig, preprocess

__all__ = ["Candidate", "DeployResult", "deploy_model", "pick_fastest", "labelled_images", "METADATA_FILE_SUFFIX"]

PathLike = Union[str, os.PathLike]
# the artifact's metadata (preprocessing, class names, engine, precision) sits beside it as FILE.json
METADATA_FILE_SUFFIX = ".json"


@dataclass
class Candidate:
    """One engine x precision tried by ``deploy_model``.

    status: "kept" (verified, timed), "rejected" (verified and failed), "failed" (could not be prepared)
    or "skipped" (runtime not installed, or nothing to judge it on).
    """

    engine: str
    precision: str
    status: str = "skipped"
    reason: str = ""
    max_abs_diff: Optional[float] = None  # fp32: worst difference from PyTorch on the verification inputs
    agreement: Optional[Agreement] = None
    latency: Optional[LatencyResult] = None
    ratio: Optional[float] = None  # median latency / the first kept candidate's
    info: Dict[str, object] = field(default_factory=dict)
    # what the device must install to run the file (``Engine.device_needs``): packages, torch or not, size
    device: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}"

    def to_dict(self) -> Dict[str, object]:
        return dict(engine=self.engine, precision=self.precision, status=self.status, reason=self.reason,
                    max_abs_diff=self.max_abs_diff, agreement=self.agreement.to_dict() if self.agreement else None,
                    latency=self.latency.to_dict() if self.latency else None, ratio=self.ratio, info=self.info,
                    device=self.device)


@dataclass
class DeployResult:
    model: str
    output_dir: str
    artifact: str
    chosen: Candidate
    candidates: List[Candidate]
    command: str
    thresholds: Dict[str, float]
    evaluated_on: str
    threads: int
    files: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return dict(model=self.model, output_dir=self.output_dir, artifact=self.artifact, chosen=self.chosen.label,
                    command=self.command, thresholds=self.thresholds, evaluated_on=self.evaluated_on,
                    threads=self.threads, candidates=[c.to_dict() for c in self.candidates])


def judge(c: Candidate, min_agreement: float, max_drop: float) -> None:
    """Keep or reject a verified candidate by its agreement with the training form."""
    a = c.agreement
    if a is None:
        c.status, c.reason = "rejected", "not compared with the training form"
    elif a.top1_agreement < min_agreement:
        c.status, c.reason = "rejected", (f"top-1 agreement {a.top1_agreement:.1%} with the training form "
                                          f"< {min_agreement:.0%} on {a.n} images")
    elif a.accuracy_drop is not None and a.accuracy_drop > max_drop:
        c.status, c.reason = "rejected", f"accuracy drop {a.accuracy_drop:.2f} points > {max_drop:g}"
    else:
        c.status, c.reason = "kept", ""


def pick_fastest(candidates: Sequence[Candidate]) -> Optional[Candidate]:
    """The kept candidate with the lowest median latency (None when none was kept)."""
    kept = [c for c in candidates if c.status == "kept" and c.latency is not None]
    return min(kept, key=lambda c: c.latency.median_ms) if kept else None


def labelled_images(folder: PathLike, label_names: Optional[Sequence[str]] = None, limit: Optional[int] = None
                    ) -> Tuple[List[Path], Optional[List[int]]]:
    """Image files under ``folder`` and, when it is laid out as class folders, their class indices.

    Class folders named like the model's class names map to those indices; otherwise folders named by
    integers map to those integers; otherwise the folder has no usable labels (None).
    """
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images in {folder}")
    # spread the limit over the classes (sorted order would take the first classes only)
    if limit is not None and len(files) > limit:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, limit)]
    root = Path(folder)
    classes = [f.parent.relative_to(root).as_posix() for f in files]
    if any(c == "." for c in classes):
        return files, None
    names = list(label_names or [])
    if names and all(c in names for c in classes):
        return files, [names.index(c) for c in classes]
    if all(c.isdigit() for c in classes):
        return files, [int(c) for c in classes]
    return files, None


def _samples(files: Sequence[Path], cfg: PreprocessConfig) -> List[np.ndarray]:
    out = []
    for f in files:
        try:
            out.append(preprocess(f, cfg)[None])
        except ValueError as e:  # an unreadable image is skipped and reported, not fatal
            print(f"deploy: skipped {e}")
    return out


def deploy_model(
    model,
    output_dir: PathLike,
    checkpoint: Optional[PathLike] = None,
    calib_dir: Optional[PathLike] = None,
    val_dir: Optional[PathLike] = None,
    engines: Optional[Sequence[str]] = None,
    precisions: Sequence[str] = PRECISIONS,
    threads: int = 1,
    input_size: Optional[Tuple[int, int]] = None,
    min_agreement: float = 0.99,
    max_drop: float = 0.5,
    calib_count: int = 64,
    val_count: int = 500,
    runs: int = 30,
    warmup: int = 5,
    rounds: int = 5,
    machine: str = "",
    log: Callable[[str], None] = print,
    torch_free: bool = False,
) -> DeployResult:
    """Try every engine x precision, keep the verified ones, write the fastest to ``output_dir``.

    Args:
        model: a model name (CPUBone variant or timm model) or a built training-form model.
        checkpoint: weights to load into a named model.
        calib_dir: images to calibrate int8 on (without it, int8 is skipped).
        val_dir: images to judge agreement on; class folders give accuracy too.
        engines: engine names to try (default: every installed one that writes a file).
        precisions: precisions to try where an engine runs them.
        min_agreement / max_drop: keep a candidate whose top-1 agreement with the training form is at least
            ``min_agreement`` and whose accuracy drops at most ``max_drop`` points on a labelled ``val_dir``.
        machine: a line naming the machine, written into the report.
        torch_free: choose only among files that run without torch on the device (ONNX Runtime, OpenVINO,
            LiteRT, ncnn): torch is the heaviest thing a Raspberry Pi installs.
    """
    from ..models import create_model
    from .export import model_metadata

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    for d, what in ((calib_dir, "calibration"), (val_dir, "validation")):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{what} folder not found: {d}")
    if not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement}: must be in (0, 1]")
    name = model if isinstance(model, str) else getattr(model, "pretrained_cfg", {}).get("architecture", "model")
    if isinstance(model, str):
        model = create_model(model, pretrained=checkpoint if checkpoint is not None else False)
    model.eval()
    if input_size is None:
        input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:])
    meta = model_metadata(model, tuple(input_size), name=name)
    cfg = PreprocessConfig.from_metadata(meta)
    labels_meta = json.loads(meta.get("cpubone.labels", "null"))
    shape = (1, *cfg.input_size)

    calib = _samples(list_images(calib_dir)[:calib_count], cfg) if calib_dir is not None else []
    eval_labels = None
    if val_dir is not None:
        files, eval_labels = labelled_images(val_dir, labels_meta, val_count)
        eval_x, evaluated_on = _samples(files, cfg), f"{len(files)} images in {val_dir}"
        if eval_labels is not None and len(eval_x) != len(eval_labels):
            raise ValueError(f"unreadable images in {val_dir}: cannot pair images with their labels")
    elif calib:
        eval_x, evaluated_on = calib, f"{len(calib)} calibration images in {calib_dir}"
    else:
        eval_x = [x for _, x in verification_inputs(cfg)[1:]]
        evaluated_on = f"{len(eval_x)} scikit-image photos (give --val or --calib for a real judgement)"
    eval_x = np.concatenate(eval_x) if eval_x else np.zeros((0, *cfg.input_size), np.float32)
    reference = torch_reference(model)(eval_x) if len(eval_x) else None
    checks = verification_inputs(cfg)

    from ..engines import inference_form

    form = inference_form(model)
    names = list(engines) if engines is not None else [e for e in engine_names() if engine_class(e).suffix]
    work = output_dir / ".candidates"
    candidates: List[Candidate] = []
    runners = {}
    for engine in names:
        cls = engine_class(engine)
        for precision in precisions:
            if precision not in cls.precisions:
                continue
            c = Candidate(engine, precision, device=cls.device_needs())
            candidates.append(c)
            if not cls.suffix:
                c.reason = "writes no file to deploy"
                continue
            if torch_free and not cls.torch_free:
                c.reason = "its file needs torch on the device (--torch-free)"
                continue
            if precision == "int8" and not calib:
                c.reason = "int8 needs calibration images"
                continue
            log(f"deploy: preparing {c.label}")
            try:
                runner = get_engine(engine).prepare(form, shape, precision, threads, calib=calib,
                                                    workdir=work / f"{engine}-{precision}")
            except MissingExtraError as e:
                c.reason = str(e)
                continue
            except Exception as e:  # conversions fail in many library-specific ways; record and go on
                c.status, c.reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            c.info = {k: v for k, v in runner.describe().items() if k not in ("engine", "precision", "artifact")}
            if precision == "fp32":
                try:
                    c.max_abs_diff = max(ch.max_abs_diff for ch in verify_fp32(runner, model, checks))
                except EngineVerificationError as e:
                    c.status, c.reason = "rejected", str(e)
                    continue
            if reference is not None:
                c.agreement = agreement(runner(eval_x), reference, eval_labels)
            judge(c, min_agreement, max_drop)
            if c.status == "kept":
                runners[c.label] = runner
    if runners:
        log(f"deploy: timing {len(runners)} verified candidate(s)")
        lat = time_interleaved({k: r.timer() for k, r in runners.items()}, runs, warmup, rounds, threads)
        first = None
        for c in candidates:
            if c.label in lat:
                c.latency = lat[c.label]
                first = first or c.latency.median_ms
                c.ratio = c.latency.median_ms / first
    chosen = pick_fastest(candidates)
    if chosen is None:
        shutil.rmtree(work, ignore_errors=True)
        why = "; ".join(f"{c.label}: {c.reason}" for c in candidates if c.reason) or "no engine installed"
        raise ValueError(f"no engine x precision passed verification ({why})")
    artifact = _write_artifact(runners[chosen.label], output_dir, meta, chosen, name, threads)
    shutil.rmtree(work, ignore_errors=True)
    command = f"cpubone predict {artifact} IMAGE..." + (f" --threads {threads}" if threads != 1 else "")
    result = DeployResult(name, str(output_dir), str(artifact), chosen, candidates, command,
                          dict(min_agreement=min_agreement, max_drop=max_drop), evaluated_on, threads)
    result.files = _write_report(result, output_dir, machine)
    return result


def _write_artifact(runner, output_dir: Path, meta: Dict[str, str], chosen: Candidate, name: str,
                    threads: int) -> Path:
    """Copy the chosen runner's files to ``output_dir`` as model.* and write their metadata beside them."""
    # the engines name their files model.* (model.int8.onnx, model.xml + model.bin, model.ncnn.param + .bin)
    output_dir.mkdir(parents=True, exist_ok=True)
    for f in runner.files:
        shutil.copy2(f, output_dir / f.name)
    dest = output_dir / runner.artifact.name
    suffix = engine_class(chosen.engine).suffix
    meta = dict(meta, **{"cpubone.engine": json.dumps(chosen.engine), "cpubone.precision": json.dumps(chosen.precision),
                         "cpubone.threads": json.dumps(threads), "cpubone.model": json.dumps(name)})
    if suffix == ".onnx":
        from ..engines.onnx_export import add_metadata

        add_metadata(dest, meta)
    Path(str(dest) + METADATA_FILE_SUFFIX).write_text(json.dumps(meta, indent=2))
    return dest


def _write_report(result: DeployResult, output_dir: Path, machine: str) -> Dict[str, str]:
    rows = []
    for c in result.candidates:
        a, d = c.agreement, c.device
        rows.append([c.engine, c.precision, c.status + (" (chosen)" if c is result.chosen else ""),
                     f"{c.latency.median_ms:.2f}" if c.latency else "", f"{c.ratio:.2f}" if c.ratio else "",
                     f"{a.top1_agreement:.1%}" if a else "", f"{a.accuracy:.1f}" if a and a.accuracy is not None else "",
                     f"{c.max_abs_diff:.1e}" if c.max_abs_diff is not None else "",
                     "yes" if d.get("torch_free") else "no", " ".join(map(str, d.get("packages", []))),
                     f"{d['installed_mb']:.0f}" if d.get("installed_mb") is not None else "?", c.reason])
    head = ["engine", "precision", "status", "median ms", "ratio", "top-1 agreement", "accuracy %", "fp32 max diff",
            "runs without torch", "device installs", "installed MB (here)", "reason"]
    lines = [f"# cpubone deploy: {result.model}", "", f"Machine: {machine}" if machine else "",
             f"Batch 1, {result.threads} thread(s); agreement judged on {result.evaluated_on}; "
             f"kept when top-1 agreement >= {result.thresholds['min_agreement']:.0%} and accuracy drop <= "
             f"{result.thresholds['max_drop']:g} points. Ratios are to the first kept row, timed in the same "
             f"interleaved rounds. What the device installs to run each file with `cpubone predict` (and the size of "
             f"those packages with what they require, as installed on this machine; `--torch-free` chooses only "
             f"among files that run without torch).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Chosen: **{result.chosen.label}** -> `{result.artifact}`", "", "Run it:", "",
              f"    {result.command}", ""]
    files = {"markdown": str(output_dir / "deploy.md"), "json": str(output_dir / "deploy.json")}
    Path(files["markdown"]).write_text("\n".join(lines))
    Path(files["json"]).write_text(json.dumps(dict(result.to_dict(), machine=machine), indent=2))
    timed = [c for c in result.candidates if c.latency is not None]
    try:
        import matplotlib
    except ImportError:
        return files
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(timed) + 1.5))
    ax.barh([c.label for c in timed], [c.latency.median_ms for c in timed],
            color=["tab:green" if c is result.chosen else "tab:blue" for c in timed])
    ax.invert_yaxis()
    ax.set_xlabel(f"median latency, ms (batch 1, {result.threads} thread(s))")
    ax.set_title(f"{result.model}: verified engines on {machine.split(' (')[0] if machine else 'this CPU'}",
                 fontsize=9)
    fig.tight_layout()
    files["plot"] = str(output_dir / "deploy.png")
    fig.savefig(files["plot"], dpi=120)
    plt.close(fig)
    return files
