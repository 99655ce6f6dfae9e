"""Run configuration as a dataclass, with validation that names the offending setting."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from gaf.core import check_rule, check_tau
from gaf.core.measures import check_measure
from gaf.core.robust import check_krum
from gaf.faults import FAULT_KINDS
from gaf.thresholds import parse_threshold
from gaflab.data import DATASETS, canonical_name
from gaflab.methods import CONTROLS, METHODS, canonical_method
from gaflab.models import MODELS
from gaflab.noise import NOISE_KINDS, check_rate
from gaflab.source_noise import (
    SOURCE_NOISE_KINDS,
    check_source_split,
    resolve_source_rates,
)
from gaflab.speed import check_amp

__all__ = ["METHODS", "OPTIMIZERS", "SCHEDULES", "TrainConfig"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")


@dataclass
class TrainConfig:
    """One training run. Defaults are the demo's: Fashion-MNIST, 40% symmetric noise.

    Each optimizer step uses ``num_micro_batches`` micro-batches of ``micro_batch_size``
    samples (a batch of ``batch_size = micro_batch_size * num_micro_batches``). ``average``
    accumulates their gradients (plain data-parallel SGD); ``gaf`` filters them by cosine
    distance with threshold ``tau`` and skips the step when fewer than two agree. Runs that
    differ only in ``method``/``tau``/``rule`` see exactly the same micro-batches, in the
    same order, from the same initial weights.
    """

    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = True
    train_size: int | None = 20000  # random subset of the training split (None: all)
    test_size: int | None = None
    noise: str = "symmetric"
    noise_rate: float = 0.4
    human_labels: str | None = None  # CIFAR-N label set for noise="human"
    # Noise per source (gaflab.source_noise): the training set split into
    # noise_sources random sources, the fraction bad_sources of them carrying the noise of
    # kind `noise` at source_noise_rate (None: the rate that makes the overall rate
    # noise_rate; given: noise_rate becomes the overall rate it implies), the others at
    # other_source_noise_rate. source_batches: every micro-batch from one source (False:
    # micro-batches mix sources, the control for the same noisy labels).
    noise_sources: int | None = None
    bad_sources: float | None = None
    source_noise_rate: float | None = None
    other_source_noise_rate: float = 0.0
    source_batches: bool = True
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR
    # model
    model: str = "small_cnn"
    width: int | None = None  # channels of the first layer (None: small_cnn 16, resnets 64)
    # method
    method: str = "gaf"
    tau: float = 0.97
    rule: str = "mean"
    # gaf.thresholds.parse_threshold spec ("null-tail:z=1", "quantile:target_acceptance=0.7",
    # ...): replaces tau for GAF runs when set.
    threshold: str | None = None
    measure: str = "cosine"  # agreement measure (gaf.core.measures): cosine, sign, layerwise
    micro_batch_size: int = 32
    num_micro_batches: int = 2
    class_balanced: bool = False  # micro-batches with micro_batch_size / K samples per class
    # blind controls (random-skip: p, random-drop: q); None: matched to GAF by gaf compare
    control_rate: float | None = None
    control_rates: list[float] | None = None  # one rate per epoch (matched per epoch)
    matched_to: str | None = None  # label of the GAF run whose rate the control takes
    match_per_epoch: bool = False  # matched controls follow GAF's rate epoch by epoch
    # small-loss: forget rate (None: the training set's known noise fraction) reached
    # linearly over forget_epochs epochs (co-teaching's T_k)
    forget_rate: float | None = None
    forget_epochs: int = 10
    gce_q: float = 0.7  # generalized cross-entropy
    # a held-out split of the training set with its noisy labels (early-stop needs one);
    # every run of a comparison should use the same fraction to see the same micro-batches
    holdout_fraction: float = 0.0
    patience: int | None = None  # early-stop: epochs without improvement (None: run all)
    # collapse warnings: chance accuracy within this margin; GAF acceptance floor
    collapse_margin: float = 0.02
    acceptance_floor: float = 0.25
    # fault injection (gaf.faults): the last faulty_rows micro-batches of every step are
    # corrupted as `fault` says (sign-flip, scale, noise, nonfinite, stale, wrong-labels)
    fault: str | None = None
    faulty_rows: int = 1
    # optimisation
    epochs: int = 12
    max_steps: int | None = None  # cap on optimizer steps per epoch (quick checks)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    max_grad_norm: float | None = None
    # bookkeeping
    seed: int = 0
    device: str = "cpu"  # "auto": cuda when available
    threads: int | None = None
    eval_batch_size: int = 256  # CPU convolutions run fastest at a few hundred images
    record_distances: bool = True
    progress: bool = True
    name: str | None = None  # label in tables and plots
    # long runs (gaflab.speed, gaflab.checkpoint)
    amp: str | None = None  # "bf16" or "fp16" autocast (fp16 with a GradScaler)
    channels_last: bool = False  # NHWC layout for model and step inputs
    compile: bool = False  # torch.compile the model for the training steps
    checkpoint_every: int | None = None  # steps between checkpoints (each epoch end: always)

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.num_micro_batches

    @property
    def per_source_batches(self) -> bool:
        """Whether every micro-batch is drawn from a single source."""
        return self.noise_sources is not None and self.source_batches

    @property
    def bad_source_noise_rate(self) -> float:
        """The noise rate inside a bad source (validated settings; 0 without sources)."""
        if self.noise_sources is None:
            return 0.0
        return resolve_source_rates(self.noise_rate, self.bad_sources,
                                    self.source_noise_rate, self.other_source_noise_rate)[0]

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method not in ("gaf", *CONTROLS):
            return self.method
        if self.method in CONTROLS:
            letter = "p" if self.method == "random-skip" else "q"
            if self.matched_to is not None or (self.control_rate is None
                                               and self.control_rates is None):
                return f"{self.method} (matched{' per epoch' if self.match_per_epoch else ''})"
            if self.control_rates is not None:
                return f"{self.method} ({letter} per epoch)"
            return f"{self.method} ({letter}={self.control_rate:.3g})"
        extra = f", {self.rule}" if self.rule != "mean" else ""
        if self.measure != "cosine":
            extra += f", {self.measure}"
        if self.threshold:
            return f"gaf ({self.threshold}{extra})"
        return f"gaf (tau={self.tau:g}{extra})"

    def validate(self) -> TrainConfig:
        """Normalise names and check every setting; ValueError naming the problem."""
        self.dataset = canonical_name(self.dataset)
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {self.noise!r}; choose from {', '.join(NOISE_KINDS)}")
        self.noise_rate = check_rate(self.noise_rate)
        if self.noise in ("none", "human"):
            self.noise_rate = 0.0  # the rate means nothing here; keep tables honest
        if self.noise == "human":
            if self.dataset not in ("cifar10", "cifar100"):
                raise ValueError("human noise (CIFAR-N) needs dataset cifar10 or cifar100")
            if self.human_labels is None:
                self.human_labels = "aggre" if self.dataset == "cifar10" else "noisy"
        self._validate_sources()
        model = self.model.strip().lower().replace("-", "_")
        if model == "cnn":
            model = "small_cnn"
        if model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(MODELS)}")
        self.model = model
        self.method = canonical_method(self.method)
        self.tau = check_tau(self.tau)
        check_rule(self.rule)
        if self.rule == "multi-krum":  # Krum's f = 1 needs M > 4: say so before training
            check_krum(self.num_micro_batches)
        self._validate_method_options()
        check_measure(self.measure)
        if self.threshold is not None:
            parse_threshold(self.threshold)  # ValueError naming the bad part
        _positive_int("micro_batch_size", self.micro_batch_size)
        _positive_int("num_micro_batches", self.num_micro_batches)
        if self.method in ("gaf", *CONTROLS) and self.num_micro_batches < 2:
            raise ValueError(f"{self.method} needs at least 2 micro-batches per step "
                             "(num_micro_batches >= 2)")
        self._validate_fault()
        _positive_int("epochs", self.epochs)
        _positive_int("eval_batch_size", self.eval_batch_size)
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None:
                _positive_int(name, v)
        if self.train_size is not None and self.train_size < self.batch_size:
            raise ValueError(
                f"train_size {self.train_size} is smaller than one batch "
                f"({self.num_micro_batches} x {self.micro_batch_size})"
            )
        if self.class_balanced:
            k = DATASETS[self.dataset].num_classes
            if self.micro_batch_size % k:
                raise ValueError(
                    f"class-balanced micro-batches need micro_batch_size divisible by the "
                    f"{k} classes of {self.dataset}, got {self.micro_batch_size}"
                )
        if self.class_balanced and self.per_source_batches:
            raise ValueError(
                "class_balanced and noise_sources with source_batches both choose the "
                "micro-batches; set source_batches=False (--no-source-batches) or drop "
                "class_balanced"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}"
            )
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be < 1, got {self.momentum}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        if self.width is not None:
            _positive_int("width", self.width)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        self.amp = check_amp(self.amp)
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(self.device)
        return self

    def _validate_fault(self) -> None:
        if self.fault is None:
            return
        if self.fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.fault!r}; choose from {', '.join(FAULT_KINDS)}")
        _positive_int("faulty_rows", self.faulty_rows)
        if self.faulty_rows > self.num_micro_batches:
            raise ValueError(f"faulty_rows {self.faulty_rows} exceeds the "
                             f"{self.num_micro_batches} micro-batches of a step")

    def _validate_sources(self) -> None:
        if self.noise_sources is None:
            for name in ("bad_sources", "source_noise_rate"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs noise_sources (the number of sources)")
            if self.other_source_noise_rate != 0:
                raise ValueError("other_source_noise_rate needs noise_sources "
                                 "(the number of sources)")
            return
        if self.noise not in SOURCE_NOISE_KINDS:
            raise ValueError(
                f"noise_sources needs noise {' or '.join(SOURCE_NOISE_KINDS)}, "
                f"got noise {self.noise!r}"
            )
        if self.bad_sources is None:
            raise ValueError("noise_sources needs bad_sources, the fraction of sources that "
                             "carry the noise (e.g. 0.4)")
        check_source_split(self.noise_sources, self.bad_sources)
        self.bad_sources = float(self.bad_sources)
        # The overall rate is what tables and reports show, as for the other kinds.
        self.noise_rate = resolve_source_rates(self.noise_rate, self.bad_sources,
                                               self.source_noise_rate,
                                               self.other_source_noise_rate)[1]

    def _validate_method_options(self) -> None:
        rates = [self.control_rate] if self.control_rate is not None else []
        if self.control_rates is not None:
            self.control_rates = [float(r) for r in self.control_rates]
            if not self.control_rates:
                raise ValueError("control_rates is empty: give one rate per epoch, or None")
            rates += self.control_rates
        for r in rates:
            if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r <= 1.0):
                raise ValueError(f"control rate must be a probability in [0, 1], got {r!r}")
        if self.forget_rate is not None and not (
                math.isfinite(self.forget_rate) and 0.0 <= self.forget_rate < 1.0):
            raise ValueError(f"forget_rate must lie in [0, 1), got {self.forget_rate!r}")
        if isinstance(self.forget_epochs, bool) or not isinstance(self.forget_epochs, int) \
                or self.forget_epochs < 0:
            raise ValueError(f"forget_epochs must be an integer >= 0, got {self.forget_epochs!r}")
        if not (math.isfinite(self.gce_q) and 0.0 <= self.gce_q <= 1.0):
            raise ValueError(f"gce_q must lie in [0, 1] (0: cross-entropy), got {self.gce_q!r}")
        if not (math.isfinite(self.holdout_fraction) and 0.0 <= self.holdout_fraction < 1.0):
            raise ValueError(
                f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction!r}")
        if self.method == "early-stop" and self.holdout_fraction == 0:
            raise ValueError("early-stop needs a held-out split: set holdout_fraction "
                             "(--holdout-fraction), e.g. 0.1, for every compared run")
        if self.patience is not None:
            _positive_int("patience", self.patience)
        for name in ("collapse_margin", "acceptance_floor"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device this process can use, or a ValueError saying why not
    (unknown name, no CUDA in this torch build or no GPU, an index past the last GPU, MPS
    missing), before anything is loaded or trained."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto "
                         "(cuda when available, else cpu)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise ValueError(f"device {device!r} asked for, but {why}: use --device cpu, "
                             "or --device auto to take a GPU when there is one")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: there are {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"device {device!r} is not available in this torch build / on this "
                         "machine: use --device cpu, cuda or auto")
    return dev


def _positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def micro_batches_per_step(batch_size: int, micro_batch_size: int) -> int:
    """How many micro-batches of ``micro_batch_size`` make a batch of ``batch_size``."""
    _positive_int("batch_size", batch_size)
    _positive_int("micro_batch_size", micro_batch_size)
    if micro_batch_size > batch_size:
        raise ValueError(
            f"micro-batch size {micro_batch_size} is larger than the batch size {batch_size}"
        )
    if batch_size % micro_batch_size:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of the micro-batch size {micro_batch_size}"
        )
    return batch_size // micro_batch_size
