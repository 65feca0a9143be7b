"""Healing's settings and the checks its options alone decide, without torch: ``compresskit heal``
answers a bad option before torch or transformers are imported (docs/architecture.md, start-up
time). ``TrainSettings`` is the shared trainer's (``loop.py``; ``finetune``'s ``FinetuneSettings``),
``HealSettings`` adds the loss, what trains, LoRA and the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import InputError

LOSSES = ("kd", "ce", "kd+ce")


@dataclass(frozen=True)
class LossSpec:
    """The loss of a healing run (``losses.healing_loss``): kind, KD weight, temperature, top-K."""

    kind: str = "kd"
    kd_weight: float = 0.5  # kd+ce only
    temperature: float = 1.0
    top_k: int | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce"


TRAIN_MODES = ("auto", "full", "neighbours", "lora")
#: WeLore's fine-tuning window; an unset --seqlen is this, fitted to the model's context.
DEFAULT_SEQLEN = 512


def default_warmup(steps: int) -> int:
    """Warmup steps when none are given: 100 (the reference's) but never more than 10 % of the run."""
    return max(0, min(100, steps // 10))


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights (plus evaluation / saving cadence)."""

    data: tuple[str, ...]
    steps: int | None
    lr: float = 5e-5
    batch_size: int = 4
    #: None: ``DEFAULT_SEQLEN`` (WeLore's 512), lowered to the model's context when shorter; the
    #: default that was lowered is then recorded as ``seqlen_default``
    seqlen: int | None = None
    seqlen_default: int | None = None
    #: None: ``default_warmup(steps)`` = min(100, 10 % of the steps), resolved once steps are known.
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    data_format: str = "window"
    text_field: str | None = None
    seed: int = 0
    grad_checkpointing: bool = False
    eval_data: str | None = None
    eval_every: int = 100
    eval_windows: int = 8
    save_every: int = 100

    # Changing these does not change the trained weights, so a resumed run may change them.
    CADENCE = ("grad_checkpointing", "eval_data", "eval_every", "eval_windows", "save_every", "seqlen_default")

    def __post_init__(self) -> None:
        if self.warmup is None and isinstance(self.steps, int) and not isinstance(self.steps, bool):
            object.__setattr__(self, "warmup", default_warmup(self.steps))

    def validate(self) -> None:
        if not self.data:
            raise InputError("pass --data SOURCE (a calibration source such as file:corpus.jsonl or c4)")
        for name in ("steps", "batch_size", "seqlen", "eval_every", "eval_windows", "save_every"):
            value = getattr(self, name)
            if name == "seqlen" and value is None:
                continue  # fitted to the model once it is loaded
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"--lr must be > 0, got {self.lr:g}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise InputError(f"--warmup must be in [0, --steps {self.steps}], got {self.warmup}; e.g. --warmup {self.steps // 10}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio:g}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"--max-grad-norm must be > 0, got {self.max_grad_norm:g}")

    def resume_key(self) -> dict[str, Any]:
        """The settings a saved training state must share with the run that resumes it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.CADENCE}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * (self.seqlen or DEFAULT_SEQLEN)



def parse_targets(targets: str | None) -> str | list[str]:
    """``None`` / ``all-linear`` → peft's all-linear; ``q_proj,v_proj`` → those module names."""
    if targets is None or targets.strip() in ("", "all-linear"):
        return "all-linear"
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise InputError("--lora-targets: give module names separated by commas (e.g. q_proj,v_proj) or all-linear")
    return names


#: the default LoRA rank; alpha defaults to twice the rank
DEFAULT_LORA_RANK = 16


@dataclass(frozen=True)
class HealSettings(TrainSettings):
    """The trainer's settings plus healing's own (all of them decide the healed weights)."""

    steps: int | None = None
    lr: float = 1e-4
    tokens: int | None = None
    loss: str = "kd"
    kd_weight: float | None = None   # kd+ce only; None: 0.5
    temperature: float = 1.0
    kl_top_k: int | None = None
    train: str = "auto"
    lora_rank: int | None = None     # --train lora only; None: DEFAULT_LORA_RANK
    lora_alpha: float | None = None  # None: 2 × rank
    lora_targets: str | None = None  # None: all-linear
    merge: bool = False
    teacher: str | None = None

    def check_options(self) -> None:
        """What the options alone decide (before anything is read)."""
        if self.loss not in LOSSES:
            raise InputError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.train not in TRAIN_MODES:
            raise InputError(f"unknown --train {self.train!r}; choose one of {', '.join(TRAIN_MODES)}")
        if (self.steps is None) == (self.tokens is None):
            raise InputError("give exactly one of --steps N and --tokens N (e.g. --tokens 4M)")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1):
            raise InputError(f"--tokens must be a whole number of tokens >= 1, got {self.tokens!r}")
        if self.kd_weight is not None:
            if self.loss != "kd+ce":
                raise InputError(f"--kd-weight applies to --loss kd+ce only (this run uses --loss {self.loss}); drop it")
            if not 0.0 <= self.kd_weight <= 1.0:
                raise InputError(f"--kd-weight must be in [0, 1], got {self.kd_weight:g}")
        if not self.temperature > 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature:g}")
        if self.loss == "ce" and (self.temperature != 1.0 or self.kl_top_k is not None or self.teacher):
            flag = "--teacher" if self.teacher else "--temperature" if self.temperature != 1.0 else "--kl-top-k"
            raise InputError(f"{flag} applies to distillation (--loss kd or kd+ce), not --loss ce; drop it")
        if self.kl_top_k is not None and (isinstance(self.kl_top_k, bool) or self.kl_top_k < 1):
            raise InputError(f"--kl-top-k must be an integer >= 1, got {self.kl_top_k!r}")
        lora_given = [f for f, v in (("--lora-rank", self.lora_rank), ("--lora-alpha", self.lora_alpha),
                                     ("--lora-targets", self.lora_targets)) if v is not None]
        if self.train != "lora":
            if self.merge:
                raise InputError(f"--merge merges LoRA adapters into the weights; it applies to --train lora only "
                                 f"(this run trains the weights themselves: --train {self.train}); drop it")
            if lora_given:
                raise InputError(f"{lora_given[0]} applies to --train lora only; drop it or pass --train lora")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or self.lora_rank < 1):
            raise InputError(f"--lora-rank must be an integer >= 1, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise InputError(f"--lora-alpha must be > 0, got {self.lora_alpha:g}")
        if self.train == "lora":
            parse_targets(self.lora_targets)

    @property
    def loss_spec(self) -> LossSpec:
        return LossSpec(kind=self.loss, kd_weight=0.5 if self.kd_weight is None else self.kd_weight,
                        temperature=self.temperature, top_k=self.kl_top_k)

    @property
    def rank(self) -> int:
        return self.lora_rank or DEFAULT_LORA_RANK

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.rank


def parse_tokens(text: str | int | None) -> int | None:
    """``4M`` / ``500k`` / ``1.5G`` / ``20000`` → a number of tokens."""
    if text is None or isinstance(text, int):
        return text
    raw = str(text).strip().replace("_", "")
    scale = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}.get(raw[-1:].lower(), 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise InputError(f"--tokens {text!r}: give a number of tokens such as 20000, 500k or 4M") from None
    if value < 1 or value != value:
        raise InputError(f"--tokens must be >= 1, got {text!r}")
    return int(round(value))


