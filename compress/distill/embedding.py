"""Recovery of a pruned sentence-embedding encoder by distillation from its dense parent, without labels.

The student (a slimmed encoder from `compress prune --objective embedding`) learns to give the embeddings its
teacher (the dense model it was pruned from) gives, on passages of unlabelled text (compress.embeddings.calib,
a fresh seeded draw of `batch_size` passages per step). Both pool as their directories say (the served
embedding: pooled, normalised where the model normalises). The loss of a batch of B passages, student
embeddings s `[B, D]`, teacher's t `[B, D]`:

    mean_i ||s_i - t_i||^2  +  relational * mean_ij (cos(s_i, s_j) - cos(t_i, t_j))^2

the embedding MSE (as in Reimers & Gurevych 2020, multilingual distillation) plus the in-batch similarity
matrices matched (relational distillation, as in Park et al. 2019): what STS and retrieval read are the
cosines between embeddings, and the second term asks for them directly. AdamW, linear warm-up then linear
decay; the token embeddings stay the teacher's unless `train_embeddings` (the pruner never changes them, and
the calibration text covers few of the vocabulary's rows). The held-out loss (another seeded draw of
passages) is measured before, during and after. The output is written once, atomically, with the student's
pooling files and prune.json, and `distill.json` (settings, history).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.device import pick_device
from compress.distill.embed_config import HELDOUT_PASSAGES, EmbedDistillConfig
from compress.errors import UserError

RECORD_FILE = "distill.json"
POOL = 16  # batches sorted by length together
SAME = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, relational: float) -> tuple[torch.Tensor, dict]:
    """(loss, its parts as floats) of `[B, D]` student and teacher embeddings (the formula above)."""
    mse = (student - teacher).pow(2).sum(-1).mean()
    s, t = (torch.nn.functional.normalize(e, dim=-1) for e in (student, teacher))
    rel = (s @ s.T - t @ t.T).pow(2).mean()  # [B, B] cosine matrices
    return mse + relational * rel, {"mse": float(mse.detach()), "relational": float(rel.detach())}


def is_encoder(path) -> bool:
    """Whether the model in `path` (a name, hub id or directory) is an encoder (not a Gemma decoder)."""
    from compress.arch.gemma import MODEL_TYPES
    from compress.models import checkpoint

    return checkpoint.read_config(checkpoint.resolve(path)).model_type not in MODEL_TYPES


def check_pair(student, teacher) -> None:
    """UserError unless the student (an Embedder) is a shape the pruner makes from the teacher, pooled alike."""
    from compress.arch import get_adapter

    s_cfg, t_cfg = student.config, teacher.config
    for key in SAME:
        if getattr(s_cfg, key, None) != getattr(t_cfg, key, None):
            raise UserError(f"teacher and student differ in {key} ({getattr(t_cfg, key, None)} vs "
                            f"{getattr(s_cfg, key, None)}): the student must be pruned from this teacher")
    s_pool, t_pool = student.pooling, teacher.pooling
    if (s_pool.mode, s_pool.normalize) != (t_pool.mode, t_pool.normalize):
        raise UserError(f"teacher and student pool differently ({t_pool.describe()} vs {s_pool.describe()})")
    s_ad, t_ad = get_adapter(student.encoder), get_adapter(teacher.encoder)
    shapes = zip(s_ad.num_heads(), s_ad.num_filters(), t_ad.num_heads(), t_ad.num_filters())
    for i, (h, f, th, tf) in enumerate(shapes):
        if h > th or f > tf:
            raise UserError(f"student layer {i} ({h} heads, {f} filters) is larger than the teacher's ({th}, {tf})")


class Trainer:
    """Distils `student` from `teacher` (Embedders) on `batches` (a function of the step) under `config`."""

    def __init__(self, config: EmbedDistillConfig, student, teacher, batch_at, heldout: list[dict]):
        self.config, self.student, self.teacher, self.batch_at, self.heldout = config, student, teacher, batch_at, heldout
        self.params = trainable(student.encoder, config.train_embeddings)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.history, self.seconds = 0, [], 0.0

    def lr_at(self, step: int) -> float:
        c = self.config
        warm = max(1, round(c.warmup * c.steps))
        if step < warm:
            return c.lr * (step + 1) / warm
        return c.lr * max(0.0, (c.steps - step) / max(c.steps - warm, 1))

    def train_step(self, batch: dict) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with torch.no_grad():
            target = self.teacher(**batch)  # [B, D]
        loss, _ = embedding_loss(self.student(**batch), target, self.config.relational)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The loss and its parts on the held-out batches, averaged over batches."""
        parts = [embedding_loss(self.student(**b), self.teacher(**b), self.config.relational) for b in self.heldout]
        entry = {"step": self.step, "loss": sum(float(p[0]) for p in parts) / len(parts)}
        for key in parts[0][1]:
            entry[key] = sum(p[1][key] for p in parts) / len(parts)
        self.history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in entry.items()})
        return self.history[-1]

    def run(self, progress: bool = True) -> None:
        c, every = self.config, max(1, self.config.steps // 5)
        self.student.eval()  # no dropout: every passage is fresh, and the target is the dropout-free teacher
        self.evaluate()
        bar = tqdm(total=c.steps, desc="distill (embedding)", unit="step", disable=not progress)
        for step in range(c.steps):
            t0 = time.perf_counter()
            loss = self.train_step(self.batch_at(step))
            self.seconds += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_at(step):.2e}", refresh=False)
            if self.step % every == 0 or self.step == c.steps:
                entry = self.evaluate()
                if progress:
                    bar.write(f"step {self.step}/{c.steps}: held-out loss {entry['loss']:.5f} (MSE {entry['mse']:.5f}, "
                              f"relational {entry['relational']:.5f})")
        bar.close()


def trainable(encoder, train_embeddings: bool) -> list[torch.nn.Parameter]:
    """The encoder's parameters to train (all but the token embeddings, unless asked); the others frozen."""
    frozen = set() if train_embeddings else {id(encoder.get_input_embeddings().weight)}
    params = []
    for p in encoder.parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params.append(p)
    return params


def passage_batches(tokenizer, config: EmbedDistillConfig, limit: int, device):
    """(function step -> training batch, held-out batches, source): seeded passages of the calibration text,
    tokenized and padded (`[B, S]`), `batch_size` fresh ones per step. Each run of `POOL` batches is sorted by
    length before it is cut into batches (little padding: a CPU step costs what its tokens cost), and its batches
    are shuffled, seeded."""
    from compress.data import batching
    from compress.embeddings import calib

    docs, source = calib.documents(config.calib, config.data_dir)
    size, length = config.batch_size, min(config.max_seq_length, limit)
    train = batching.encode(tokenizer, [(t, None, 0.0) for t in calib.passages(docs, config.steps * size, config.seed)],
                            length)
    held = batching.encode(tokenizer, [(t, None, 0.0) for t in calib.passages(docs, HELDOUT_PASSAGES, config.seed + 1)],
                           length)
    order, gen = [], torch.Generator().manual_seed(config.seed)
    for start in range(0, len(train), POOL * size):
        pool = sorted(range(start, min(start + POOL * size, len(train))), key=lambda i: len(train[i]["input_ids"]))
        chunks = [pool[i:i + size] for i in range(0, len(pool), size)]
        order += [chunks[int(j)] for j in torch.randperm(len(chunks), generator=gen)]
    pad = batching.pad_id_of(tokenizer)

    def collate(features: list[dict]) -> dict:
        batch = batching.collate(features, pad)
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    heldout = [collate(held[i:i + size]) for i in range(0, len(held), size)]
    return (lambda step: collate([train[i] for i in order[step]])), heldout, source


def distill_embedding(config: EmbedDistillConfig, progress: bool = True) -> dict:
    """Distil `config.student` from `config.teacher` into `config.output`; returns the distill.json record."""
    from compress.distill.state import read_prune_record
    from compress.embeddings.model import Embedder, load_embedder, max_length
    from compress.embeddings.pooling import read_pooling
    from compress.models import checkpoint
    from compress.models.outputs import atomic_output_dir, check_output_dir

    config.validate()
    output, device = Path(config.output), pick_device(config.device)
    in_place = output.resolve() == Path(config.student).resolve()
    check_output_dir(output, config.overwrite or in_place)
    student_path, teacher_path = checkpoint.resolve(config.student), checkpoint.resolve(config.teacher)
    for path, role in ((student_path, "student"), (teacher_path, "teacher")):
        if not is_encoder(path):
            raise UserError(f"the {role} {path} is a decoder; embedding distillation takes two encoders")
    model = checkpoint.load(student_path, device, allow_base=True)
    student, tokenizer = Embedder(model.base_model, read_pooling(student_path)), checkpoint.load_tokenizer(student_path)
    teacher = load_embedder(teacher_path, device)[0].eval()
    check_pair(student, teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    batch_at, heldout, source = passage_batches(tokenizer, config, max_length(student.config, student.pooling), device)
    trainer = Trainer(config, student, teacher, batch_at, heldout)
    trainer.run(progress)
    record = {"student": str(config.student), "teacher": str(config.teacher), "teacher_dir": str(teacher_path),
              "objective": "embedding", "text": source, "steps_done": trainer.step,
              "passages": trainer.step * config.batch_size, "seconds": round(trainer.seconds, 1),
              "history": trainer.history, "settings": config.settings()}
    prune_record = read_prune_record(student_path)
    with atomic_output_dir(output, overwrite=True) as tmp:
        checkpoint.save(model.cpu(), tokenizer, tmp, prune_record, source_dir=student_path)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def distill_pruned_embedding(prune_config, progress: bool = True, **settings) -> dict:
    """`compress prune --objective embedding --distill-steps N`: distil the pruned output in place from the model
    it was pruned from, on the calibration text; `settings`: further EmbedDistillConfig fields."""
    config = EmbedDistillConfig(student=prune_config.output, teacher=prune_config.model, output=prune_config.output,
                                steps=prune_config.distill_steps, calib=prune_config.calib,
                                data_dir=prune_config.data_dir, device=prune_config.device, seed=prune_config.seed,
                                max_seq_length=prune_config.max_seq_length or 128, overwrite=True, **settings)
    return distill_embedding(config, progress)


def format_record(record: dict, output) -> str:
    first, last = record["history"][0], record["history"][-1]
    return (f"distilled {record['student']} from {record['teacher']} (embeddings): {record['steps_done']} steps, "
            f"{record['passages']:,} passages in {record['seconds']:.0f} s\n"
            f"  held-out loss {first['loss']:.5f} -> {last['loss']:.5f} (MSE {first['mse']:.5f} -> {last['mse']:.5f}, "
            f"relational {first['relational']:.5f} -> {last['relational']:.5f})\n  saved to {output}")
