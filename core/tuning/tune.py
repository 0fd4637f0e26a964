"""Prompt tuning: a visual prompt and a linear head trained with cross-entropy, backbone frozen.

The same trainer tunes a target prompt from any initialisation (random as in
VPT, one source prompt, the uniform average, HGPrompt's weighted prompt),
trains a linear probe (no prompt), and builds source prompts for a bank.
Model selection is on the val split (``select="last"`` takes the end of the
schedule instead, as VPT reports); the test split is touched once, at the
end, with the selected prompt and head.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..control import stop_flag
from ..errors import UserInputError
from ..io.digest import tensor_digest
from ..metrics.probe import fit_linear_heads
from ..model.device import PRECISIONS, autocast, current_precision, precision
from ..model.features import check_finite_features, prompt_features
from ..model.tokens import split_tokens
from ..options import check, choice, option, seed_option


@dataclass
class TuneConfig:
    """Hyper-parameters of prompt tuning; saved beside every result. Each field is an option of the one options table
    (:mod:`core.options`): the CLI's tuning flags and the dashboard read it, help texts included."""

    epochs: int = option(20, "passes over the train split", low=0, high=10_000)
    lr: float = option(5e-3, "AdamW (or SGD) learning rate of the prompt", low=0, low_open=True, high=100)
    head_lr: float = option(1e-3, "learning rate of the linear head (it starts from a probe fit)", low=0, low_open=True,
                            high=100)
    weight_decay: float = option(1e-4, "weight decay of the prompt and the head", low=0, high=1, high_open=True)
    batch_size: int = option(64, "training batch size", low=1, high=65_536)
    num_tokens: int = option(10, "prompt tokens T of a random initialisation", low=1, high=1024, cli="--tokens")
    deep: bool = option(False, "deep prompts (one set per block) for a random initialisation")
    n_train: int | None = option(None, "tune on a class-stratified subset of this many train images (None: all)",
                                 low=2, high=10_000_000, fix="the subset needs at least two images")
    seed: int = seed_option("initialisation, batch order and subset", cli="")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", low=0, high=1, high_open=True)
    head_init: Literal["probe", "random"] = option(
        "probe", "probe: fit the head by logistic regression on the initial features (LP-FT); random: a fresh head")
    optimizer: Literal["adamw", "sgd"] = option("adamw", "adamw, or sgd (with momentum, as VPT tunes prompts)",
                                                cli="--tune-optimizer")
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_open=True)
    warmup: float = option(0.1, "share of the steps with a linear warm-up, then cosine decay to 0", low=0, high=1,
                           low_open=True, high_open=True)
    select: Literal["val", "last"] = option(
        "val",
        "val: the epoch with the best val accuracy (epoch 0 included); last: the end of the schedule, as VPT reports")
    precision: str = choice(PRECISIONS, "the frozen backbone's precision while tuning: fp32, or bf16 "
                                  "autocast (for GPUs; the prompt, head and optimiser stay float32)",
                                  cli="--tune-precision")

    def __post_init__(self) -> None:
        check(self, normalise=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneResult:
    """A tuned prompt and head with their accuracies."""

    prompt: torch.Tensor | None  # (T, D) / (depth, T, D), or None for a linear probe
    head_weight: torch.Tensor  # (C, D)
    head_bias: torch.Tensor  # (C,)
    best_epoch: int  # the epoch whose state is kept: best validation, or the last one under select="last"
    val_acc: float  # validation accuracy of that state
    test_acc: float
    train_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {"val_acc": self.val_acc, "test_acc": self.test_acc, "train_acc": self.train_acc,
                "best_epoch": self.best_epoch, "stopped": self.stopped, "seconds": self.seconds}


def random_prompt(model, num_tokens: int, deep: bool, generator: torch.Generator) -> torch.Tensor:
    """VPT's random initialisation: uniform in +-sqrt(6 / (3 * patch^2 + D)) (Xavier over the patch projection)."""
    patch = model.backbone.patch_embed.patch_size
    d = model.embed_dim
    bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + d))
    shape = (model.depth, num_tokens, d) if deep else (num_tokens, d)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


@torch.no_grad()
def _accuracy(model, tokens: torch.Tensor, labels: torch.Tensor, prompt, head: nn.Linear, batch_size: int = 256,
              features: torch.Tensor | None = None) -> float:
    """Accuracy of ``head`` on the tokens under ``prompt``, or on precomputed ``features`` (a linear probe's)."""
    if len(labels) == 0:
        return float("nan")
    if features is None:
        features = _features(model, tokens, prompt, batch_size)
    return (head(features).argmax(1) == labels).sum().item() / len(labels)


def _features(model, tokens: torch.Tensor, prompt: torch.Tensor | None, batch_size: int = 256) -> torch.Tensor:
    """Pooled features ``(N, D)`` of frozen tokens under one prompt (None: no prompt)."""
    if prompt is None:
        return prompt_features(model, tokens, None, batch_size)
    return prompt_features(model, tokens, prompt.detach()[None], batch_size)[0]


@dataclass(frozen=True)
class InitialStateKey:
    """A tune's initial state on a task (:class:`InitialState`): it depends on the backbone and the initial prompt's
    values, not on the seed."""

    backbone: str
    device: str
    prompt: str  # the initial prompt's digest, or "none" for a linear probe
    precision: str = PRECISIONS.default  # the features' precision


@dataclass(frozen=True)
class EpochZeroTestKey:
    """The test accuracy of a tune's initial state (measured the first time a tune keeps epoch 0)."""

    state: InitialStateKey


@dataclass(frozen=True)
class InitialState:
    """What a tune starts from, made once and never changed: the probe-fitted head, epoch 0's val accuracy, and a
    linear probe's fixed features (the features never change without a prompt)."""

    head: tuple[torch.Tensor, torch.Tensor] | None  # (weight (C, D), bias (C,)) of the probe fit; None: a random head
    val_acc: float
    train_features: torch.Tensor | None = None  # (N, D), linear probes only
    val_features: torch.Tensor | None = None
    test_features: torch.Tensor | None = None


@dataclass
class Kept:
    """The state selection keeps: the best epoch's by val accuracy, or the latest under ``select="last"``."""

    epoch: int
    val_acc: float
    prompt: torch.Tensor | None
    head: dict[str, torch.Tensor]

    @classmethod
    def of(cls, epoch: int, val_acc: float, prompt: torch.Tensor | None, head: nn.Module) -> "Kept":
        return cls(epoch, val_acc, None if prompt is None else prompt.detach().clone(),
                   copy.deepcopy(head.state_dict()))


def _initial_state_key(model, prompt, config: TuneConfig) -> InitialStateKey | None:
    """The key of a tune's initial state in the task's cache, or None when the state depends on the seed.

    With the probe head and the whole train split, the state depends only on the backbone, the task and the
    initial prompt's values: another seed (or another method) starting from the same prompt reuses it.
    """
    if config.head_init != "probe" or config.n_train is not None:
        return None
    return InitialStateKey(model.fingerprint, str(model.device), "none" if prompt is None else tensor_digest(prompt),
                           current_precision())


def tune_prompt(
    model,
    task,
    init: torch.Tensor | str | None = "random",
    config: TuneConfig | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Any = None,
    train_accuracy: bool = True,
) -> TuneResult:
    """Tune a prompt and a linear head on ``task``'s train split, select on val, report test.

    ``init``: a prompt tensor ``(T, D)`` / ``(depth, T, D)`` to start from,
    ``"random"`` (VPT initialisation with ``config.num_tokens`` and
    ``config.deep``), or ``None`` for a linear probe (head only, no prompt).
    ``callback(info)`` runs after every epoch; ``should_stop`` is polled every
    batch and ends training early with the best state so far.
    ``train_accuracy=False`` skips the extra pass over the train split that
    measures the selected state's train accuracy (``train_acc`` is then NaN).

    The steps: the initial prompt, the splits' tokens, the head, the initial state (cached with the task), the
    optimiser, the epochs (each :func:`train_epoch` then a val pass and selection), the test pass.
    """
    config = config or TuneConfig()
    with precision(config.precision):
        return _tune_prompt(model, task, init, config, callback, should_stop, train_accuracy)


def _tune_prompt(model, task, init, config: TuneConfig, callback, should_stop, train_accuracy: bool) -> TuneResult:
    stop = stop_flag(should_stop)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    prompt = initial_prompt(model, init, config, gen)
    tr_tok, tr_y = train_tokens(model, task, config)
    va_tok, va_y = split_tokens(model, task, "val")
    head = random_head(model, task.num_classes, gen)
    key = _initial_state_key(model, prompt, config)
    state = task.cache.get(key) if key is not None else None
    if state is None:  # (a state kept from an earlier tune of this prompt was checked then)
        state = initial_state(model, task, prompt, head, tr_tok, tr_y, va_tok, va_y, config)
        if key is not None:
            task.cache.put(key, state)
    if state.head is not None:
        with torch.no_grad():
            head.weight.copy_(state.head[0])
            head.bias.copy_(state.head[1])
    if prompt is not None:
        prompt = nn.Parameter(prompt.to(model.device))
    opt, sched = tune_optimizer(config, head, prompt, len(tr_y))
    kept = Kept.of(0, state.val_acc, prompt, head)
    history: list[dict[str, Any]] = [{"epoch": 0, "train_loss": float("nan"), "val_acc": kept.val_acc}]
    stopped = False
    model.train()  # the backbone stays in eval mode (see PromptedViT.train)
    for epoch in range(1, config.epochs + 1):
        losses, stopped = train_epoch(model, head, prompt, opt, sched, tr_tok, tr_y, state.train_features, config,
                                      gen, stop)
        if stopped and not losses:
            break
        val_acc = _accuracy(model, va_tok, va_y, prompt, head, features=state.val_features)
        train_loss = sum(losses) / max(1, len(losses))
        if not math.isfinite(train_loss):
            raise UserInputError(f"training diverged at epoch {epoch} (loss {train_loss}); lower lr (now {config.lr}).")
        if val_acc > kept.val_acc or config.select == "last":
            kept = Kept.of(epoch, val_acc, prompt, head)
        entry = {"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc, "kept_val_acc": kept.val_acc,
                 "seconds": time.perf_counter() - t0}
        history.append(entry)
        if callback:
            callback({**entry, "epochs": config.epochs})
        if stopped:
            break
    model.eval()

    head.load_state_dict(kept.head)
    train_acc = (_accuracy(model, tr_tok, tr_y, kept.prompt, head, features=state.train_features) if train_accuracy
                 else float("nan"))
    del tr_tok, va_tok
    test_acc = kept_test_accuracy(model, task, key, state, kept, head)
    return TuneResult(
        prompt=None if kept.prompt is None else kept.prompt.cpu(),
        head_weight=head.weight.detach().cpu(),
        head_bias=head.bias.detach().cpu(),
        best_epoch=kept.epoch,
        val_acc=kept.val_acc,
        test_acc=test_acc,
        train_acc=train_acc,
        history=history,
        stopped=stopped,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------- the steps
def initial_prompt(model, init: torch.Tensor | str | None, config: TuneConfig,
                   gen: torch.Generator) -> torch.Tensor | None:
    """The prompt a tune starts from: ``init`` checked, VPT's random initialisation (``"random"``, drawn from
    ``gen``), or None (a linear probe)."""
    if isinstance(init, str):
        if init != "random":
            raise UserInputError(f"init must be a prompt tensor, 'random' or None, got {init!r}.")
        return random_prompt(model, config.num_tokens, config.deep, gen)
    if init is None:
        return None
    prompt = torch.as_tensor(init).detach().float().clone()
    model.check_prompt(prompt, "initial prompt")
    if not torch.isfinite(prompt).all():
        raise UserInputError("the initial prompt holds NaN or infinite values.")
    return prompt


def train_tokens(model, task, config: TuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen tokens and labels of the train split, or of its class-stratified ``config.n_train`` subset."""
    tr_tok, tr_y = split_tokens(model, task, "train")
    if config.n_train is not None and config.n_train < len(tr_y):
        idx = torch.as_tensor(task.subsample("train", config.n_train, config.seed), device=model.device)
        tr_tok, tr_y = tr_tok[idx], tr_y[idx]
    return tr_tok, tr_y


def random_head(model, num_classes: int, gen: torch.Generator) -> nn.Linear:
    """A linear head ``D -> C``, uniform in +-1/sqrt(D) from ``gen``, bias 0."""
    head = nn.Linear(model.embed_dim, num_classes).to(model.device)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(model.embed_dim)
        head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
        head.bias.zero_()
    return head


def initial_state(model, task, prompt: torch.Tensor | None, head: nn.Linear, tr_tok, tr_y, va_tok, va_y,
                  config: TuneConfig) -> InitialState:
    """The tune's :class:`InitialState`: the probe-fitted head (LP-FT), epoch 0's val accuracy under it (or under
    ``head``, a random head), and a linear probe's features of every split."""
    if prompt is not None:
        check_finite_features(model, tr_tok, prompt[None], ["the initial prompt"])
    f0 = fitted = None
    if config.head_init == "probe":
        # LP-FT (Kumar et al., ICLR 2022): start the head at the logistic-regression fit on the initial
        # features, so the tuning budget goes to the prompt rather than to fitting a head from scratch.
        f0 = _features(model, tr_tok, prompt)
        w, b = fit_linear_heads(f0[None], tr_y, task.num_classes, steps=100)
        fitted = (w[0].T.contiguous(), b[0].clone())
    probe = {}
    if prompt is None:
        # A linear probe's features never change: compute them once (the probe fit already did the train split's).
        te_tok = split_tokens(model, task, "test")[0]
        probe = {"train_features": f0 if f0 is not None else _features(model, tr_tok, None),
                 "val_features": _features(model, va_tok, None), "test_features": _features(model, te_tok, None)}
    start = head if fitted is None else (lambda f: F.linear(f, *fitted))
    val_acc = _accuracy(model, va_tok, va_y, prompt, start, features=probe.get("val_features"))
    return InitialState(fitted, val_acc, **probe)


def tune_optimizer(config: TuneConfig, head: nn.Linear, prompt: nn.Parameter | None, n_train: int):
    """AdamW (or SGD) over the head and the prompt, each at its learning rate, and its one-cycle schedule."""
    groups = [{"params": head.parameters(), "lr": config.head_lr}]
    if prompt is not None:
        groups.append({"params": [prompt], "lr": config.lr})
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    total_steps = max(1, config.epochs * math.ceil(n_train / config.batch_size))
    if total_steps == 1:  # OneCycleLR gives its last step lr / 25 / 1e4: a single step would barely move the prompt
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=config.warmup, anneal_strategy="cos",
        # AdamW keeps OneCycleLR's beta1 cycling (as every shipped prompt was tuned); SGD keeps its momentum fixed.
        cycle_momentum=config.optimizer == "adamw",
    )
    return opt, sched


def train_epoch(model, head: nn.Linear, prompt: nn.Parameter | None, opt, sched, tr_tok, tr_y,
                fixed: torch.Tensor | None, config: TuneConfig, gen: torch.Generator, stop) -> tuple[list[float], bool]:
    """One pass over the train split in batches ordered by ``gen`` (on a linear probe's ``fixed`` features when
    given): the batches' losses, and whether ``stop()`` ended the pass early."""
    device = model.device
    order = torch.randperm(len(tr_y), generator=gen).to(device)
    losses = []
    for i in range(0, len(order), config.batch_size):
        if stop():
            return losses, True
        b = order[i : i + config.batch_size]
        with autocast(device):
            feats = fixed[b] if fixed is not None else model.forward_tokens(tr_tok[b], prompt)
            logits = head(feats.float())
        loss = F.cross_entropy(logits.float(), tr_y[b], label_smoothing=config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, False


def kept_test_accuracy(model, task, key: InitialStateKey | None, state: InitialState, kept: Kept,
                       head: nn.Linear) -> float:
    """The kept state's test accuracy: the test split touched once. A tune that kept epoch 0 reuses (and the first
    one records) the initial state's test accuracy."""
    zero = EpochZeroTestKey(key) if key is not None and kept.epoch == 0 else None
    if zero is not None and zero in task.cache:
        return task.cache.get(zero)
    te_tok, te_y = split_tokens(model, task, "test")
    acc = _accuracy(model, te_tok, te_y, kept.prompt, head, features=state.test_features)
    if zero is not None:
        task.cache.put(zero, acc)
    return acc


STEPS_TIMED = 3  # training steps timed by the estimate, after one untimed, and averaged


def tuning_step_seconds(model, tokens: torch.Tensor, labels: torch.Tensor, prompt: torch.Tensor, num_classes: int,
                        repeat: int = STEPS_TIMED) -> list[float]:
    """Wall seconds of each of ``repeat`` plain prompt-tuning steps on the batch ``tokens`` (AdamW on a copy of the
    prompt and a fresh linear head, cross-entropy, backward, step), after one untimed step: what one step of
    :func:`tune_prompt` costs here. The estimate below and the benchmarks' step ratios use it."""
    p = nn.Parameter(prompt.detach().float().clone().to(model.device))
    head = nn.Linear(model.embed_dim, num_classes).to(model.device)
    opt = torch.optim.AdamW([p, *head.parameters()], lr=1e-6)

    def step() -> None:
        with autocast(model.device):
            logits = head(model.forward_tokens(tokens, p).float())
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = []
    model.train()
    try:
        step()
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
    finally:
        model.eval()
    return out


def estimate_tune_seconds(model, task, prompt: torch.Tensor, config: TuneConfig | None = None) -> float:
    """Seconds a :func:`tune_prompt` of ``prompt`` on ``task`` for ``config.epochs`` should take here, from a
    measurement, not a guess: the mean of :data:`STEPS_TIMED` timed training steps (after an untimed one, by
    :func:`tuning_step_seconds`) times the steps, plus an evaluation
    batch's cost per image times the images evaluated (every epoch's val pass, and once: the probe head's train
    features, the initial val and the final test). The task's test images are embedded here, once per task, as the
    first tune would do (that one-off cost once fell inside the measured tune but outside the estimate:
    docs/BENCHMARKS.md, "Tuning estimate").

    Costs about four training steps and one evaluation batch; the frozen tokens it embeds stay cached with the task.
    """
    config = config or TuneConfig()
    tr_tok, tr_y = split_tokens(model, task, "train")
    va_tok, _ = split_tokens(model, task, "val")
    b = min(config.batch_size, len(tr_y))
    steps = tuning_step_seconds(model, tr_tok[:b], tr_y[:b], prompt, task.num_classes)
    t_step = sum(steps) / len(steps)
    p = prompt.detach().float().to(model.device)
    if "test" in task.splits:
        split_tokens(model, task, "test")  # embedded once per task (a tune would do it); timed by the tab's clock
    sample = va_tok[:256] if len(va_tok) else tr_tok[:256]
    t0 = time.perf_counter()
    _features(model, sample, p)
    per_image = (time.perf_counter() - t0) / max(1, len(sample))  # an evaluation's cost grows with its images
    n_test = len(task.splits["test"]) if "test" in task.splits else 0
    n_train = len(tr_y) if config.n_train is None else min(len(tr_y), config.n_train)
    per_epoch = t_step * math.ceil(n_train / config.batch_size) + per_image * len(va_tok)
    once = per_image * (n_train + len(va_tok) + n_test)  # the probe head's train features, epoch 0's val, the test
    return config.epochs * per_epoch + once
