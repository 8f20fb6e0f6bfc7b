"""The training loop behind `se3set-ase fit`.

- Loss per molecule: w_E ((E - E_ref)/N)^2 + w_F mean (F - F_ref)^2 (eV, eV/Å); averaged over the
  global batch. Under torchrun each rank takes every ``world``-th sample of the same global batch
  and gradients are averaged by DistributedDataParallel (with ``compile``, by one all-reduce after
  the backward), so N processes compute the very same update as one process (exact up to
  floating-point summation order).
- AdamW (no weight decay on biases, norms, embeddings), linear warm-up then cosine decay to
  ``min_lr`` (per step) or reduce-on-plateau (per validation), gradient clipping, EMA of weights
  (validation, ``best`` and the final model use the EMA weights).
- Data order of epoch k is ``default_rng([seed, k]).permutation``; a checkpoint stores model,
  optimizer, EMA, schedule state, position in the epoch and history, so a killed and resumed run
  is identical to an unbroken one.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..data import read_frames, split_indices
from ..fragment import FragmentSettings
from ..hypergraph import hypergraph_stats
from ..model import ModelConfig, SE3SetModel, count_parameters, energy_and_forces, save_model
from ..model.checkpoint import atomic_torch_save
from ..model.compiled_training import CompiledTrainingForces
from .cache import LabelledGraphs, cached_graphs, training_fragmentations
from .metrics import evaluate, format_table, make_batch, per_sample_loss
from .stops import pre_empted

log = logging.getLogger("se3set_ase")
CKPT_FORMAT = "se3set-ase-checkpoint"
CKPT_VERSION = 1


class TrainingError(ValueError):
    """Bad training input or an unusable checkpoint."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoints)."""

    data: str
    out_dir: str = "runs/se3set"
    output: str | None = None  # final model file; default <out_dir>/model.pt
    valid_file: str | None = None
    test_file: str | None = None
    extra_train: list[str] = field(default_factory=list)  # files whose frames are all training frames
    energy_key: str | None = None
    forces_key: str | None = None
    train_size: float | None = None  # int count or fraction; None: all not in valid/test
    valid_size: float = 0.05
    test_size: float | None = 0.0  # None: the rest
    split_block: int = 1  # frames per contiguous block of the split (MD trajectories: > correlation time)
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    fragment: str = "auto"  # "md17" (explicit), "md22" (implicit) or "auto" (md17 up to 25 atoms)
    max_ring_system_atoms: int | None = None  # cut larger ring systems (fullerenes, nanotubes); None: published
    element_energies: dict[int, float] | None = None  # given reference energies (eV); else least squares
    dtype: str = "float32"
    device: str = "auto"
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "plateau"
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    weight_decay: float = 1e-6
    ema_decay: float = 0.99
    clip_grad: float | None = 10.0
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    seed: int = 0
    valid_every: int = 1  # epochs
    save_every_steps: int = 200
    save_every_minutes: float = 10.0
    max_time: float | None = None  # seconds
    max_steps: int | None = None
    progress: bool = True
    deterministic: bool = False  # deterministic kernels: bitwise-exact resume on CUDA too (slower)
    compile: bool = False  # training steps through one compiled graph (model/compiled_training.py)
    memory_budget: float | None = None  # with compile: what the compiled step keeps for its backward (0-1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.element_energies:
            cfg.element_energies = {int(k): float(v) for k, v in cfg.element_energies.items()}
        return cfg


# ----------------------------------------------------------------------------- helpers
def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float64": torch.float64}[name]
    except KeyError:
        raise TrainingError(f"dtype must be float32 or float64, got {name!r}") from None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StopSignals:
    """SIGTERM or SIGINT (a scheduler's pre-emption, Ctrl-C) during ``fit``: the current step ends,
    the checkpoint and the model of the best weights so far are written at once (without the
    valid/test evaluation that ``--max-time`` ends with) and ``fit`` returns, to be continued with
    ``--resume``. A second signal acts as it would without this. Installed from the main thread
    only (signal handlers cannot be set elsewhere); under torchrun every rank stops at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.name is not None:  # the second signal: what it would have done without us
            signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.name = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and writing the checkpoint", self.name)

    def received(self, world: int, device: torch.device) -> bool:
        """Whether to stop now; with several ranks, whether any rank got a signal (a collective:
        every rank calls it at every step)."""
        got = _any_rank(self.name is not None, world, device)
        if got and self.name is None:
            self.name = "SIGTERM"  # another rank's signal
        return got


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` or'ed over the ranks (every rank must call it at the same point)."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Average the parameters' gradients over the ``world`` ranks, as DistributedDataParallel does
    (for the compiled training step, which DDP's forward hooks cannot see): one all-reduce of all
    gradients flattened together. Every rank has gradients for the same parameters (the same
    network and graph); a parameter without one on every rank keeps none, as under DDP."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _maybe_init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def fit_element_energies(data: LabelledGraphs, elements: list[int]) -> dict[int, float]:
    """Least-squares per-element reference energies (eV): E ≈ sum_Z count_Z e_Z.

    With one composition (a single molecule) this spreads the mean energy over the atoms
    (minimum-norm solution), which is all the data can say.
    """
    col = {z: i for i, z in enumerate(elements)}
    a = np.zeros((len(data), len(elements)))
    for k, g in enumerate(data.graphs):
        for z, c in zip(*np.unique(g.numbers.numpy(), return_counts=True)):
            a[k, col[int(z)]] = c
    sol, *_ = np.linalg.lstsq(a, data.energies, rcond=None)
    return {z: float(sol[i]) for z, i in col.items()}


def energy_scale(data: LabelledGraphs, e_ref: dict[int, float]) -> float:
    """RMS of the force components (eV/Å·Å = eV per unit network output); falls back to the
    per-atom energy residual spread when forces are all zero."""
    f = np.concatenate(data.forces)
    rms = float(np.sqrt(np.mean(f ** 2)))
    if rms > 1e-8:
        return rms
    resid = [(e - sum(e_ref[int(z)] for z in g.numbers.tolist())) / g.num_atoms
             for g, e in zip(data.graphs, data.energies)]
    return float(np.std(resid)) or 1.0


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(cfg: TrainConfig, step: int, total: int, plateau_factor: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (0.01 + 0.99 * step / max(cfg.warmup_steps, 1))
    if cfg.schedule == "plateau":
        return max(cfg.lr * plateau_factor, cfg.min_lr)
    frac = min(1.0, (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


class EMA:
    """Exponential moving average of parameters (decay warmed up as min(d, (1+n)/(10+n)))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in model.named_parameters():
            self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange model parameters and EMA parameters (call twice to restore)."""
        for k, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.num_updates = int(s["num_updates"])
        for k, v in s["shadow"].items():
            self.shadow[k].copy_(v)


# ----------------------------------------------------------------------------- data
def _read(path: str, cfg: TrainConfig):
    frames = read_frames(path, energy_key=cfg.energy_key, forces_key=cfg.forces_key)
    if not frames:
        raise TrainingError(f"{path}: no frames")
    return frames


def _fragment_settings(cfg: TrainConfig, n_atoms: int) -> FragmentSettings:
    name = cfg.fragment
    if name == "auto":
        name = "md17" if n_atoms <= 25 else "md22"
    return dataclasses.replace(FragmentSettings.preset(name), max_ring_system_atoms=cfg.max_ring_system_atoms)


def _source_path(spec: str) -> str:
    p = Path(spec)
    if p.is_file():
        return str(p)
    from ..data import DataError, resolve_dataset

    if ":" not in spec:
        raise DataError(f"data file {spec} does not exist (named datasets look like md17:aspirin)")

    return str(resolve_dataset(spec))


def prepare_data(cfg: TrainConfig, settings: FragmentSettings | None = None):
    """Read, split and fragment (cached). Returns settings, {train, valid, test} and split indices."""
    src = _source_path(cfg.data)
    frames = _read(src, cfg)
    settings = settings or _fragment_settings(cfg, max(len(f) for f in frames))
    extra = {"energy_key": cfg.energy_key, "forces_key": cfg.forces_key}
    data, cache_file, reused = cached_graphs(src, frames, settings, extra, cfg.progress and _world()[0] == 0)
    valid_default = 0.0 if cfg.valid_file else cfg.valid_size
    test_size = cfg.test_size if not cfg.test_file else 0.0
    train = cfg.train_size
    if train is None:
        n = len(frames)
        nv = int(valid_default) if valid_default >= 1 else int(round(valid_default * n))
        nt = 0 if test_size is None else (int(test_size) if test_size >= 1 else int(round(test_size * n)))
        train = n - nv - nt
    split = split_indices(len(frames), train=_num(train), valid=_num(valid_default), test=_num(test_size), seed=cfg.seed,
                          block=cfg.split_block)
    sets = {k: data.subset(v) for k, v in split.items()}
    # what build_graphs froze for this file (one per topology), with training frames as the
    # reference geometries: stored in the model files, pinned for the separate valid/test files
    # here and by the calculator (Fragmenter.for_model), in whatever atom order they come
    pins = training_fragmentations(frames, settings, reference_indices=split["train"])
    for name, f in (("valid", cfg.valid_file), ("test", cfg.test_file)):
        if f:
            fr = _read(_source_path(f), cfg)
            sets[name], _, _ = cached_graphs(_source_path(f), fr, settings, extra, False, pinned=pins)
    for f in cfg.extra_train or ():  # added to training after the split: valid and test stay as they are
        fr = _read(_source_path(f), cfg)
        more, _, _ = cached_graphs(_source_path(f), fr, settings, extra, False, pinned=pins)
        t = sets["train"]
        sets["train"] = LabelledGraphs(t.graphs + more.graphs, np.concatenate([t.energies, more.energies]),
                                       t.forces + more.forces)
    return settings, sets, split, {"cache_file": str(cache_file), "cache_reused": reused, "source": src,
                                   "fragmentations": [p.to_dict() for p in pins]}


def _num(x):
    if x is None:
        return None
    return int(x) if float(x) >= 1 or float(x) == 0 else float(x)


# ----------------------------------------------------------------------------- checkpoint
def _ckpt_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "last.ckpt"


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"no checkpoint to resume from at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TrainingError(f"{path} is not a readable training checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{path} is not an se3set-ase training checkpoint")
    if ck.get("version") != CKPT_VERSION:
        raise TrainingError(f"{path} has checkpoint version {ck.get('version')}; this se3set-ase reads {CKPT_VERSION}")
    return ck


# ----------------------------------------------------------------------------- main loop
def fit(cfg: TrainConfig, resume: bool = False, argv: list[str] | None = None,
        given: set[str] | None = None) -> dict[str, Any]:
    """Train a model; returns the final metrics and paths.

    With ``resume`` the run continues from ``<out_dir>/last.ckpt`` under the checkpoint's config;
    ``cfg`` supplies only how long to run and how to report (``max_time``, ``max_steps``,
    ``progress``, ``save_every_*``, ``device``, ``compile``, ``memory_budget``), the data files, and ``epochs`` / ``output`` when
    named in ``given`` (the fields the user set; ``None``: take both from ``cfg``).
    """
    if cfg.memory_budget is not None and not 0.0 <= cfg.memory_budget <= 1.0:
        raise TrainingError(f"memory_budget (--memory-budget) must be within [0, 1], got {cfg.memory_budget}")
    out = Path(cfg.out_dir)
    ck = None
    if resume:
        ck = load_checkpoint(_ckpt_path(cfg))
        saved = TrainConfig.from_dict(ck["train_config"])
        given = {"epochs", "output"} if given is None else given
        # what may change on resume: how long to run, how to report, where the model goes, and the
        # data (continuing on other data is fine-tuning, not an exact resume: say so)
        if "epochs" in given and cfg.epochs != saved.epochs:
            log.warning("resuming with epochs=%d (the checkpoint's run was planned for %d): the learning-rate "
                        "schedule changes, so this is not an exact continuation; leave --epochs out for one",
                        cfg.epochs, saved.epochs)
            saved.epochs = cfg.epochs
        if "output" in given and cfg.output != saved.output:
            log.info("the model will be written to %s (the checkpoint's run named %s)",
                     cfg.output, saved.output or f"{cfg.out_dir}/model.pt")
            saved.output = cfg.output
        if cfg.compile != saved.compile:
            log.warning("resuming with compile=%s (the checkpoint's run had compile=%s): the same training up to "
                        "rounding, not a bit-for-bit continuation", cfg.compile, saved.compile)
        for k in ("max_time", "max_steps", "progress", "save_every_steps", "save_every_minutes", "device", "compile",
                  "memory_budget"):
            setattr(saved, k, getattr(cfg, k))
        saved.deterministic = saved.deterministic or cfg.deterministic
        for k in ("data", "valid_file", "test_file", "extra_train"):
            if getattr(cfg, k) != getattr(saved, k):
                log.warning("resuming with %s=%s (the checkpoint used %s): not an exact continuation",
                            k, getattr(cfg, k), getattr(saved, k))
                setattr(saved, k, getattr(cfg, k))
        cfg = saved
    with _determinism(cfg.deterministic):
        return _run(cfg, ck, out, argv)


@contextlib.contextmanager
def _determinism(on: bool):
    """``deterministic=True``: PyTorch's deterministic kernels for the run, so that on CUDA too a
    resumed run equals an unbroken one bit for bit (CUDA's atomic ``index_add`` otherwise sums in a
    varying order). cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first use in the process.
    On the CPU the kernels are deterministic either way."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _run(cfg: TrainConfig, ck: dict[str, Any] | None, out: Path, argv: list[str] | None) -> dict[str, Any]:
    device = _device(cfg.device)
    if ck is not None and device.type == "cuda" and not cfg.deterministic:
        log.info("resuming on CUDA without --deterministic: the continuation equals an unbroken run up to the "
                 "order of CUDA's atomic sums (last bits); give --deterministic from the start for bit-for-bit")
    _maybe_init_distributed(device)
    rank, world = _world()
    dtype = _dtype(cfg.dtype)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    settings = FragmentSettings.from_dict(ck["model_config"]["fragment"]) if ck else None
    settings, sets, split, data_info = prepare_data(cfg, settings)
    train, valid, test = sets["train"], sets["valid"], sets.get("test")
    if len(train) == 0:
        raise TrainingError("the training set is empty (check --train-size/--valid-size)")
    for name, s in sets.items():
        if len(s) and (np.isnan(s.energies).any() or any(np.isnan(f).any() for f in s.forces)):
            raise TrainingError(f"{name} set has frames without energy/forces labels (NaN)")
    data_elements = sorted({int(z) for g in train.graphs + valid.graphs + (test.graphs if test else [])
                            for z in g.numbers.tolist()})

    if ck:
        mcfg = ModelConfig.from_dict(ck["model_config"])
        unknown = sorted(set(data_elements) - set(mcfg.elements))
        if unknown:
            raise TrainingError(f"the data contain elements {unknown} unknown to the resumed model "
                                f"(elements {mcfg.elements})")
    else:
        stats = hypergraph_stats(train.graphs)
        max_d = max(float((g.positions[g.v2e_src] - g.positions[g.token_anchor[g.v2e_dst]]).norm(dim=-1).max())
                    if g.v2e_src.numel() else 1.0 for g in train.graphs)
        overrides = {"max_radius": float(math.ceil(max_d)), **cfg.model_overrides}
        mcfg = ModelConfig.preset(cfg.preset, elements=data_elements, fragment=settings, **overrides)
    torch.manual_seed(cfg.seed)
    model = SE3SetModel(mcfg, dtype)
    model.fragmentations = data_info.pop("fragmentations")  # saved with every model file
    if not ck:
        e_ref = cfg.element_energies or fit_element_energies(train, data_elements)
        missing = set(data_elements) - set(e_ref)
        if missing:
            raise TrainingError(f"--element-energies lacks elements {sorted(missing)}")
        model.set_statistics(e_ref, energy_scale(train, e_ref), stats["avg_node_degree"], stats["avg_hyperedge_degree"])
    model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    ema = EMA(model, cfg.ema_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch  # the schedule's length; --max-steps only stops early
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": math.inf, "plateau_factor": 1.0,
             "plateau_best": math.inf, "plateau_bad": 0, "elapsed": 0.0, "history": []}
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        ema.load_state_dict(ck["ema"])
        state.update(ck["state"])
        state["history"] = list(ck["state"]["history"])
        if math.isfinite(state["best"]) and rank == 0 and not (out / "best.pt").is_file():
            log.warning("resuming without %s: the best weights so far (valid score %.4g) are lost, so the "
                        "final model will be the best of the epochs still to come (or the last weights); "
                        "copy best.pt along with last.ckpt for the unbroken run's result", out / "best.pt",
                        state["best"])
    state.setdefault("commands", [])
    state["commands"] = list(state["commands"]) + [" ".join(argv) if argv else "fit() from Python"]
    ddp = model
    if world > 1 and not cfg.compile:
        # the last block's l > 0 value paths cannot reach the scalar energy; the fused forward
        # skips them, so those parameters get no gradient
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    elif world > 1:
        # the compiled graph calls the network, not DDP's forward: the weights start from rank 0's
        # (as DDP does) and average_gradients averages the gradients after each backward
        for t in model.state_dict().values():
            dist.broadcast(t, 0)

    # the training step's energy + forces through one compiled graph (validation stays eager)
    if cfg.memory_budget is not None and not cfg.compile:
        log.warning("memory_budget=%s has no effect without compile=True (--compile)", cfg.memory_budget)
    compiled = CompiledTrainingForces(model, memory_budget=cfg.memory_budget) if cfg.compile else None

    def save_ckpt() -> None:
        if rank != 0:
            return
        atomic_torch_save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "train_config": _jsonable(asdict(cfg)),
                           "model_config": mcfg.to_dict(), "model": model.state_dict(),
                           "optimizer": opt.state_dict(), "ema": ema.state_dict(), "state": dict(state),
                           "split": {k: torch.as_tensor(v) for k, v in split.items()}}, _ckpt_path(cfg))

    def validate() -> dict[str, float]:
        ema.swap(model)
        try:
            return evaluate(model, valid, 16, device, dtype) if len(valid) else {}
        finally:
            ema.swap(model)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], disable=not cfg.progress or rank != 0,
               desc="fit", dynamic_ncols=True)
    t_start = time.time() - state["elapsed"]
    last_save = time.time()
    stopped = None
    run_loss = run_f = run_e = 0.0
    n_run = 0
    signals = _StopSignals().install()
    try:
        while state["step"] < total_steps and stopped is None:
            perm = np.random.default_rng([cfg.seed, state["epoch"]]).permutation(len(train))
            batches = [perm[i:i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
            model.train()
            # learning rate of the last step taken (reported at the epoch's end, also when a resumed
            # run starts exactly at an epoch's end)
            lr = lr_at(cfg, max(state["step"] - 1, 0), total_steps, state["plateau_factor"])
            for bi in range(state["batch_in_epoch"], len(batches)):
                lr = lr_at(cfg, state["step"], total_steps, state["plateau_factor"])
                for g in opt.param_groups:
                    g["lr"] = lr
                global_idx = batches[bi]
                b = make_batch(train, global_idx[rank::world], device, dtype)
                e, f, _ = compiled(b.graph) if compiled else energy_and_forces(ddp, b.graph, training=True)
                loss = per_sample_loss(e, f, b, cfg.energy_weight, cfg.forces_weight).sum() * world / len(global_idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if compiled and world > 1:
                    average_gradients(model, world)
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                ema.update(model)
                state["step"] += 1
                state["batch_in_epoch"] = bi + 1
                with torch.no_grad():
                    run_loss += float(loss) / world
                    run_e += float((e - b.energy).abs().mean()) * 1000
                    run_f += float((f - b.forces).abs().mean()) * 1000
                    n_run += 1
                bar.update(1)
                bar.set_postfix(loss=f"{run_loss / n_run:.3g}", E_meV=f"{run_e / n_run:.1f}", F_meV_A=f"{run_f / n_run:.1f}")
                state["elapsed"] = time.time() - t_start
                # every rank takes every decision together (a rank's clock may pass --max-time a
                # step before another's); a signal wins: it means the machine is being taken away
                got_signal = signals.received(world, device)
                over_time = _any_rank(cfg.max_time is not None and state["elapsed"] >= cfg.max_time, world, device)
                if got_signal:
                    stopped = signals.name
                elif over_time:
                    stopped = "max_time"
                elif cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                    stopped = "max_steps"
                elif state["step"] >= total_steps:
                    break
                if stopped or (state["step"] % cfg.save_every_steps == 0
                               or time.time() - last_save > 60 * cfg.save_every_minutes):
                    save_ckpt()
                    last_save = time.time()
                if stopped:
                    break
            if state["batch_in_epoch"] >= len(batches):  # epoch finished
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if state["epoch"] % cfg.valid_every == 0 or state["step"] >= total_steps:
                    metrics = validate()
                    row = {"epoch": state["epoch"], "step": state["step"], "lr": lr,
                           "train_loss": run_loss / max(n_run, 1), "train_energy_mae_meV": run_e / max(n_run, 1),
                           "train_forces_mae_meV_A": run_f / max(n_run, 1), "time_s": state["elapsed"]}
                    row.update({f"valid_{k}": v for k, v in metrics.items() if k != "n_frames"})
                    state["history"].append(row)
                    run_loss = run_e = run_f = 0.0
                    n_run = 0
                    # checkpoint metric: w_E E_MAE + w_F F_MAE (eV, eV/Å), as the reference's 1:100
                    score = (cfg.energy_weight * metrics["energy_mae_meV"]
                             + cfg.forces_weight * metrics["forces_mae_meV_A"]) / 1000 if metrics else -state["step"]
                    if cfg.schedule == "plateau" and metrics:
                        if score < state["plateau_best"]:
                            state["plateau_best"], state["plateau_bad"] = score, 0
                        else:
                            state["plateau_bad"] += 1
                            if state["plateau_bad"] > cfg.plateau_patience:
                                state["plateau_factor"] *= cfg.plateau_factor
                                state["plateau_bad"] = 0
                    if score < state["best"] and rank == 0:
                        state["best"] = score
                        ema.swap(model)
                        save_model(model, out / "best.pt", {"step": state["step"], "valid": metrics})
                        ema.swap(model)
                    if rank == 0:
                        write_reports(out, state["history"])
                        bar.write(f"epoch {state['epoch']:>4} step {state['step']:>6}  valid: E MAE "
                                  f"{metrics.get('energy_mae_meV', float('nan')):.2f} meV, F MAE "
                                  f"{metrics.get('forces_mae_meV_A', float('nan')):.2f} meV/Å")
                    save_ckpt()
                    last_save = time.time()
    finally:
        signals.restore()
    bar.close()
    save_ckpt()
    result: dict[str, Any] = {"steps": state["step"], "epochs": state["epoch"], "elapsed_s": state["elapsed"],
                              "stopped": stopped or "done", "checkpoint": str(_ckpt_path(cfg)), **data_info}
    if stopped and rank == 0:
        why = stopped if pre_empted(stopped) else f"--{stopped.replace('_', '-')}"
        print(f"stopped by {why} at step {state['step']}; continue with --resume "
              "(the model file below holds the best weights so far)")
    # final: best EMA weights (or the last EMA weights when there was no validation)
    if (out / "best.pt").is_file():
        from ..model import load_model

        final, _ = load_model(out / "best.pt", dtype=dtype, device=device)
    else:
        ema.swap(model)
        final = model
    final.eval()
    # A signal means a scheduler wants the machine back (SLURM kills 30 s after SIGTERM by
    # default): write the model of the best weights at once and leave the valid/test evaluation,
    # which takes minutes on large molecules, to the run that finishes.
    was_pre_empted = pre_empted(stopped)
    metrics: dict[str, Any] = {}
    if not was_pre_empted:
        metrics["valid"] = evaluate(final, valid, 16, device, dtype)
        if test is not None and len(test):
            metrics["test"] = evaluate(final, test, 16, device, dtype)
    result["metrics"] = metrics
    if rank == 0:
        write_reports(out, state["history"])
        if metrics:
            print(format_table(metrics))
        else:
            print(f"{stopped}: the model's valid and test errors were not measured (the finished run measures them)")
        output = Path(cfg.output) if cfg.output else out / "model.pt"
        meta = {"training": {"data": data_info["source"], "command": state["commands"][0],
                             "commands": state["commands"],  # the first, then each --resume
                             # the split's counts (make_card.py recomputes the split from them)
                             "frames": {**{k: len(v) for k, v in sets.items()}, "train": len(split["train"])},
                             **({"extra_train": {"files": list(cfg.extra_train),
                                                 "frames": len(train) - len(split["train"])}}
                                if cfg.extra_train else {}),
                             "split_block": cfg.split_block,
                             "preset": cfg.preset, "parameters": count_parameters(final),
                             "steps": state["step"], "epochs": state["epoch"], "stopped": stopped or "done",
                             "wall_time_s": state["elapsed"],
                             "device": str(device), "dtype": cfg.dtype, "seed": cfg.seed},
                "metrics": metrics}
        save_model(final, output, meta)
        np.savez(out / "split.npz", **{k: np.asarray(v) for k, v in split.items()})
        result["model"] = str(output)
        print(f"model written to {output}")
    return result


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    if out.get("element_energies"):
        out["element_energies"] = {str(k): v for k, v in out["element_energies"].items()}
    return out


def write_reports(out: Path, history: list[dict[str, Any]]) -> None:
    """CSV log (one row per validation) and a learning-curve PNG (skipped with a warning where
    matplotlib cannot be imported: the CSV holds the same figures, and a training run must not
    stop for a plot)."""
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    try:
        import matplotlib
    except ImportError as exc:
        warnings.warn(f"no learning_curve.png: matplotlib cannot be imported ({exc}); "
                      f"{out / 'log.csv'} has the same figures", stacklevel=2)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [r["epoch"] for r in history]
    for ax, key, label in ((axes[0], "energy_mae_meV", "energy MAE (meV)"), (axes[1], "forces_mae_meV_A", "force MAE (meV/Å)")):
        ax.plot(ep, [r.get(f"train_{key}", np.nan) for r in history], label="train (running)")
        ax.plot(ep, [r.get(f"valid_{key}", np.nan) for r in history], label="valid (EMA)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)
    plt.close(fig)
