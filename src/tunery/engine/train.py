"""The LoRA training loop: checkpoints, resume, cancellation, per-step reports.

One readable loop (nanoGPT style). Speed comes from bf16 base weights where the hardware runs
them, fp32 adapters, and logits computed only at label positions: the 262k-token output head
would otherwise cost more than the whole transformer body.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunery.engine.base_models import LoadedBase
from tunery.engine.checkpoint_file import StateImage, read_state
from tunery.engine.data import (
    Batch,
    TokenizedExample,
    collate,
    epoch_order,
    pack,
    split_validation,
    tokenize_example,
    validation_count,
)
from tunery.engine.fast_train import FastGemma3Train, lora_shapes, training_forward
from tunery.engine.lora import (
    ADAPTER_CONFIG,
    LoraLinear,
    adapter_state,
    load_adapter_state,
    lora_injected,
    lora_layers,
    resolved_for,
    save_peft_adapter,
    trainable_parameters,
)
from tunery.engine.specs import (
    Example,
    LoraSpec,
    StepReport,
    StopReason,
    TrainResult,
    TrainSpec,
)
from tunery.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.bin"  # `checkpoint_file`
# The Gemini API's learning rates (default 0.001) were chosen for Google's own tuning method;
# for LoRA on these models the same number, times this factor, is the AdamW step size.
LORA_LR_SCALE = 0.5
WARMUP_FRACTION = 0.1
GRAD_CLIP = 1.0
CHECKPOINT_INTERVAL_S = 60.0


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def total_steps(n_examples: int, spec: TrainSpec) -> int:
    """Optimizer steps a run over `n_examples` takes (validation examples excluded)."""
    n_val = validation_count(n_examples, spec.validation_fraction)
    return steps_per_epoch(n_examples - n_val, spec.batch_size) * spec.epoch_count


def optimizer_lr(spec: TrainSpec) -> float:
    return spec.effective_learning_rate * LORA_LR_SCALE


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup, then linear decay to 10% of peak. `step` is 0-based."""
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (1.0 - 0.9 * progress)


def train(
    base: LoadedBase,
    examples: Sequence[Example],
    spec: TrainSpec,
    work_dir: Path,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `examples`; resume from `work_dir`'s checkpoint if there is one.

    A `work_dir` that holds a finished adapter and no checkpoint was trained to the end by a run
    that died before its caller heard of it: that adapter is the result, nothing is retrained.
    """
    if not examples:
        raise InvalidArgument("the training dataset has no examples")
    if not FastGemma3Train.fits(base.config, spec.lora):
        spec = replace(spec, lora=resolved_for(base.model, spec.lora))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tok = base.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 0. setup: split, tokenize, schedule — everything that can fail before any compute
    train_set, val_set = split_validation(examples, spec.validation_fraction, spec.seed)
    train_tok = [tokenize_example(tok, e, spec.max_seq_len) for e in train_set]
    val_tok = [tokenize_example(tok, e, spec.max_seq_len) for e in val_set]
    per_epoch = steps_per_epoch(len(train_tok), spec.batch_size)
    total = per_epoch * spec.epoch_count
    peak_lr = optimizer_lr(spec)
    finished = work_dir / ADAPTER_DIR
    if (finished / ADAPTER_CONFIG).exists() and _checkpoint_path(work_dir) is None:
        return TrainResult(StopReason.COMPLETED, total, total, str(finished))

    torch.manual_seed(spec.seed)
    adapter = _adapter(base, spec.lora, pad_id)
    with adapter as (layers, batch_loss), CheckpointWriter(work_dir) as checkpoints:
        params = trainable_parameters(layers)
        opt = _optimizer(params, peak_lr)
        step = _load_checkpoint(work_dir, layers, opt)
        if step:
            log.info("resuming %s at step %d/%d", work_dir.name, step, total)
        last_ckpt = time.monotonic()
        while step < total:
            epoch, index = divmod(step, per_epoch)
            if should_stop is not None and should_stop():
                checkpoints.save(step, layers, opt)
                return TrainResult(StopReason.CANCELLED, step, total, None)
            # 1. batch: this epoch's fixed order, so a resumed run sees the same batches
            order = epoch_order(len(train_tok), spec.seed, epoch)
            picked = order[index * spec.batch_size : (index + 1) * spec.batch_size]
            # 2. set LR, forward/backward, clip, step
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, peak_lr)
            loss = batch_loss([train_tok[i] for i in picked])
            if not torch.isfinite(loss):
                raise FailedPrecondition(
                    f"training diverged at step {step + 1}: the loss is {loss.item()}; "
                    "try a lower learningRate or learningRateMultiplier"
                )
            loss.backward()  # type: ignore[no-untyped-call]
            clip_grad_norm(params, GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            # 3. checkpoint (written in the background) at epoch ends and every so often;
            # not after the last step, where the adapter itself is written at once
            epoch_end = step % per_epoch == 0
            val_loss = _validate(batch_loss, val_tok, spec) if epoch_end else None
            due = epoch_end or time.monotonic() - last_ckpt > CHECKPOINT_INTERVAL_S
            if due and step < total:
                checkpoints.save(step, layers, opt, wait=False)
                last_ckpt = time.monotonic()
            # 4. report
            if on_step is not None:
                on_step(
                    StepReport(
                        step=step,
                        epoch=epoch + 1,
                        mean_loss=float(loss.item()),
                        compute_time=time.time(),
                        total_steps=total,
                        validation_loss=val_loss,
                    )
                )
        checkpoints.wait()
        adapter_dir = _save_adapter(work_dir, layers, spec, base)
        for folder in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"):
            shutil.rmtree(work_dir / folder, ignore_errors=True)
        return TrainResult(StopReason.COMPLETED, step, total, str(adapter_dir))


BatchLoss = Callable[[Sequence[TokenizedExample]], torch.Tensor]


@contextmanager
def _adapter(
    base: LoadedBase, lora: LoraSpec, pad_id: int
) -> Iterator[tuple[dict[str, LoraLinear], BatchLoss]]:
    """The LoRA layers to train and the loss of a batch through them. On the hand-written packed
    forward (`fast_train`) where the model and LoRA config allow: the layers alone, no
    transformers model built (a worker then never imports transformers). Else injected into the
    transformers model, in train mode for the duration, on a padded batch."""
    if FastGemma3Train.fits(base.config, lora):
        forward = training_forward(base.config, base.weights, base.kernel_cache)
        layers = lora_layers(lora_shapes(forward), lora, base.device)
        fast = FastGemma3Train(forward, layers)
        yield layers, lambda examples: fast.loss(pack(examples, base.device))
        return
    causal = base.model
    with lora_injected(causal, lora) as layers:
        causal.train()
        try:
            yield layers, lambda batch: label_loss(causal, collate(batch, pad_id, base.device))
        finally:
            causal.eval()


def prepare_optimizer() -> None:
    """Do now what a process's first `train()` would before its first step: torch.optim's
    methods import torch._dynamo on their first call, 1.9 s on a 2-core CPU (a worker's preload
    calls this, so a job does not wait for it)."""
    _optimizer([torch.nn.Parameter(torch.zeros(8))], 0.0).zero_grad(set_to_none=True)


def _optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    fused = _fused_adamw(params)
    return torch.optim.AdamW(
        params, lr=lr, weight_decay=0.0, fused=fused, foreach=None if fused else True
    )


def _fused_adamw(params: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW can run as one fused kernel (CPU and CUDA fp32) rather than a Python loop
    over 250 small tensors, which costs more than the update itself on a CPU."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` in three multi-tensor ops: torch loops over the tensors
    one by one on a CPU (500 small ops a step for 250 LoRA matrices)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


def label_loss(causal: Any, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over label positions, with logits computed only there."""
    out = causal.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = out.last_hidden_state  # (B, T, C)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_positions)  # (N, C)
    logits = causal.lm_head(picked).float()  # (N, V)
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, batch.labels)


@torch.no_grad()
def _validate(
    batch_loss: BatchLoss, val_tok: list[TokenizedExample], spec: TrainSpec
) -> float | None:
    if not val_tok:
        return None
    total_loss, total_labels = 0.0, 0
    for i in range(0, len(val_tok), spec.batch_size):
        chunk = val_tok[i : i + spec.batch_size]
        labels = sum(e.label_count for e in chunk)
        total_loss += float(batch_loss(chunk)) * labels
        total_labels += labels
    return total_loss / max(1, total_labels)


class CheckpointWriter:
    """Writes checkpoints (adapter + optimizer state + step) whole or not at all, off the
    training thread: the state is copied at once (`StateImage`), the file is written and
    fsynced meanwhile."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None
        self._last: StateImage | None = None  # written: its buffer serves the next one

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def save(
        self,
        step: int,
        layers: dict[str, LoraLinear],
        opt: torch.optim.Optimizer,
        wait: bool = True,
    ) -> None:
        self.wait()
        state = {
            "step": step,
            "adapter": adapter_state(layers),
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
        }
        self._last = image = StateImage(state, reuse=self._last)
        self._pending = self._pool.submit(self._write, image)
        if wait:
            self.wait()

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, image: StateImage) -> None:
        tmp = self.work_dir / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        image.write(tmp / CHECKPOINT_FILE)
        _replace_dir(tmp, self.work_dir / CHECKPOINT_DIR)


def _load_checkpoint(
    work_dir: Path, layers: dict[str, LoraLinear], opt: torch.optim.Optimizer
) -> int:
    path = _checkpoint_path(work_dir)
    if path is None:
        return 0
    state = read_state(path)
    load_adapter_state(layers, state["adapter"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _checkpoint_path(work_dir: Path) -> Path | None:
    """The newest whole checkpoint: the current one, or the one a crash left mid-swap."""
    for folder in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"):  # see _replace_dir
        path = work_dir / folder / CHECKPOINT_FILE
        if path.exists():
            return path
    return None


def _save_adapter(
    work_dir: Path, layers: dict[str, LoraLinear], spec: TrainSpec, base: LoadedBase
) -> Path:
    """Save the PEFT adapter (safetensors) to a temp dir, fsync, then rename into place."""
    tmp = work_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_peft_adapter(layers, spec.lora, str(base.model_dir), tmp)
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    target = work_dir / ADAPTER_DIR
    _replace_dir(tmp, target)
    return target


def _replace_dir(src: Path, dst: Path) -> None:
    """Swap `src` in for `dst`; readers see the old or the new folder, never a mix."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
