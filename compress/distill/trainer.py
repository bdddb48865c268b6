"""The distillation loop: a pruned Gemma learns its dense parent's next-token distributions.

One step: the teacher's final hidden states (no gradient; bf16 weights on the GPU), the student's (bf16
autocast over fp32 weights on the GPU, plain fp32 on the CPU), the KL through both LM heads
(compress.distill.loss), one AdamW step (betas 0.9/0.95) on the student's layers and final norm (the tied
embedding and LM head stay the teacher's unless `train_embeddings`), gradients clipped to `max_grad_norm`, a
linear warm-up then a cosine decay to `min_lr_ratio` of the peak. Held-out perplexity, KL and agreement
every `eval_every` steps; a progress bar in tokens with tokens/s and ETA. `Trainer` never touches the disk:
`distill` (below) loads, checks, resumes and checkpoints around it (compress.distill.state).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.device import autocast, pick_device
from compress.distill import state as ckpt
from compress.distill.config import DistillConfig
from compress.distill.loss import compare, kd_loss_grad
from compress.errors import UserError


class Trainer:
    """Distils `student` from `teacher` on `windows` (compress.distill.data.Windows) under `config`."""

    def __init__(self, config: DistillConfig, student, teacher, windows, progress: bool = True):
        from compress.arch import get_adapter

        self.config, self.student, self.teacher, self.windows = config, student, teacher, windows
        self.progress = progress
        self.s_adapter, self.t_adapter = get_adapter(student), get_adapter(teacher)
        self.params = trainable(student, config.train_embeddings)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.9, 0.95),
                                           weight_decay=config.weight_decay)
        self.step, self.history, self.seconds = 0, [], 0.0
        self.eval_every = config.eval_every or max(1, config.num_steps // config.evals)
        if config.activation_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def lr_at(self, step: int) -> float:
        c, total = self.config, self.config.num_steps
        warm = max(1, round(c.warmup * total)) if c.warmup else 0
        if step < warm:
            return c.lr * (step + 1) / warm
        done = (step - warm) / max(total - warm, 1)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))

    def train_step(self, ids: torch.Tensor) -> float:
        """One optimizer step on `[B, L]` windows; the mean KL before it."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.student.train()
        with torch.no_grad(), autocast(ids.device):
            t_hidden = self.t_adapter.final_hidden(ids)
        with autocast(ids.device):
            s_hidden = self.s_adapter.final_hidden(ids)
        grad, loss = kd_loss_grad(self.s_adapter, self.t_adapter, s_hidden, t_hidden)
        s_hidden.backward(grad)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def evaluate(self) -> dict:
        self.student.eval()
        result = compare(self.student, self.teacher, self.windows.heldout, self.config.batch_size)
        entry = {"step": self.step, "tokens": self.step * self.config.tokens_per_step,
                 **{k: round(v, 5) for k, v in result.items() if k != "num_tokens"}}
        self.history.append(entry)
        return entry

    def run(self, checkpoint=None) -> None:
        """Train to `config.num_steps`; `checkpoint(self, final)` is called when one is due and at the end."""
        c, device = self.config, next(self.student.parameters()).device
        per_step, last_save = c.tokens_per_step, time.perf_counter()
        bar = tqdm(total=c.num_steps * per_step, initial=self.step * per_step, unit="tok", unit_scale=True,
                   desc="distill", disable=not self.progress)
        if not self.history:
            self._report(bar, self.evaluate())
        while self.step < c.num_steps:
            t0 = time.perf_counter()
            loss = self._guarded_step(self.windows.batch(self.step, c.batch_size, c.seed).to(device))
            self.seconds += time.perf_counter() - t0
            bar.update(per_step)
            bar.set_postfix(kl=f"{loss:.4f}", lr=f"{self.lr_at(self.step - 1):.2e}", refresh=False)
            if self.step % self.eval_every == 0 or self.step == c.num_steps:
                self._report(bar, self.evaluate())
            due = (self.step % c.save_every == 0) if c.save_every else \
                time.perf_counter() - last_save >= 60 * c.save_minutes
            if checkpoint is not None and (due or self.step == c.num_steps):
                checkpoint(self, self.step == c.num_steps)
                last_save = time.perf_counter()
        bar.close()

    def _guarded_step(self, ids: torch.Tensor) -> float:
        try:
            return self.train_step(ids)
        except torch.cuda.OutOfMemoryError:
            hint = "" if self.config.activation_checkpointing else ", or pass --activation-checkpointing"
            raise UserError(f"out of GPU memory at --batch-size {self.config.batch_size} x --seq-len "
                            f"{self.config.seq_len}: lower --batch-size{hint}") from None

    def _report(self, bar, entry: dict) -> None:
        if self.progress:
            bar.write(f"step {entry['step']}/{self.config.num_steps} ({entry['tokens']:,} tokens): held-out perplexity "
                      f"{entry['perplexity']:.3f}, KL {entry['kl']:.4f}, top-1 agreement {entry['agreement']:.1%}")

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "history": self.history,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]
        self.optimizer.load_state_dict(state["optimizer"])


def trainable(model, train_embeddings: bool) -> list[torch.nn.Parameter]:
    """The parameters to train (all but the input embedding, which Gemma ties to the LM head, unless asked);
    the others are frozen."""
    embedding = model.get_input_embeddings().weight
    params = []
    for p in model.parameters():
        p.requires_grad_(train_embeddings or p is not embedding)
        if p.requires_grad:
            params.append(p)
    return params


def distill(config: DistillConfig, progress: bool = True) -> dict:
    """Distil `config.student` from `config.teacher` into `config.output`; returns the distill.json record."""
    from compress.distill.data import distill_windows, text_windows
    from compress.models.checkpoint import load_tokenizer

    config.validate()
    output, device = Path(config.output), pick_device(config.device)
    record, state = _resume_point(config, output)
    if record is not None and state is None:
        print(f"{output} is already distilled ({record['tokens_done']:,} tokens); nothing to resume")
        return record
    student_path, student_config = ckpt.read_gemma_config(output if state is not None else config.student, "student")
    teacher_path, teacher_config = ckpt.read_gemma_config(config.teacher, "teacher")
    tokenizer = load_tokenizer(student_path)
    ckpt.check_pair(student_config, teacher_config, tokenizer, load_tokenizer(teacher_path))
    prune_record = ckpt.read_prune_record(student_path)
    text = text_windows(tokenizer, config)
    student = ckpt.load_model(student_path, "student", device)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = ckpt.load_model(teacher_path, "teacher", device, teacher_dtype).eval()
    windows = distill_windows(teacher, tokenizer, config, text, sampled=state and state.get("sampled"))
    trainer = Trainer(config, student, teacher, windows, progress)
    if state is not None:
        trainer.load_state_dict(state)
    info = {"student": str(config.student), "teacher": str(config.teacher), "teacher_dir": str(teacher_path),
            "text": windows.source, "num_train_windows": len(windows.train), "num_sampled": windows.num_sampled}

    def save(run: Trainer, final: bool) -> None:
        run_state = None if final else {**run.state_dict(), "sampled": windows.sampled()}
        ckpt.save_checkpoint(output, student, tokenizer, prune_record, _record(run, info, final), run_state)

    try:
        trainer.run(save)
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}; the last complete checkpoint is in {output} (`--resume` goes on "
              "from it)" if output.exists() else f"interrupted at step {trainer.step}, before the first checkpoint")
        raise
    return _record(trainer, info, True)


def _resume_point(config: DistillConfig, output: Path):
    """(record, state) to resume from, (record, None) for a finished output, (None, None) for a fresh start."""
    from compress.models.outputs import check_output_dir

    if not config.resume:
        check_output_dir(output, config.overwrite)
        return None, None
    if not output.exists():
        return None, None
    record, state = ckpt.read_progress(output)
    if record is None and output.resolve() == Path(config.student).resolve():
        return None, None  # pruned in place (`compress prune --distill-tokens`), stopped before a checkpoint
    if record is None:
        raise UserError(f"{output} holds no distillation checkpoint to resume (no {ckpt.RECORD_FILE})")
    changed = {k: v for k, v in config.training_settings().items() if record["settings"].get(k) != v}
    if changed:
        raise UserError("--resume with settings other than the checkpoint's: "
                        + ", ".join(f"{k} {record['settings'].get(k)!r} -> {v!r}" for k, v in changed.items()))
    return record, state


def _record(run: Trainer, info: dict, complete: bool) -> dict:
    c = run.config
    done = run.step * c.tokens_per_step
    return {**info, "complete": complete, "steps_done": run.step, "num_steps": c.num_steps, "tokens_done": done,
            "seconds": round(run.seconds, 1), "tokens_per_second": round(done / max(run.seconds, 1e-9), 1),
            "history": run.history, "settings": c.settings()}


def distill_pruned(prune_config, progress: bool = True, **settings) -> dict:
    """`compress prune --distill-tokens N`: distil the pruned output in place from the model it was pruned from,
    on the calibration text; `settings`: further DistillConfig fields."""
    config = DistillConfig(student=prune_config.output, teacher=prune_config.model, output=prune_config.output,
                           tokens=prune_config.distill_tokens, calib=prune_config.calib,
                           data_dir=prune_config.data_dir, device=prune_config.device, seed=prune_config.seed,
                           overwrite=True, **settings)
    return distill(config, progress)
