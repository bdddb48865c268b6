"""Tiny seeded random encoders (2 layers, hidden 64, 4 heads, 128 filters) and tiny tasks for tests.

Nothing is downloaded: configs are built in code, tokenizers are a word-level vocabulary written
into the model directory.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

KINDS = ("bert", "distilbert", "roberta", "mpnet")
WORDS = "good great fine bad awful poor movie film plot actor scene story very not really quite".split()


def tiny_config(kind: str, num_labels: int = 2):
    from transformers import AutoConfig

    common = dict(vocab_size=64, max_position_embeddings=64, num_labels=num_labels, pad_token_id=1)
    if kind == "distilbert":
        return AutoConfig.for_model("distilbert", dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                    dropout=0.0, attention_dropout=0.0, **common)
    return AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, **common)


def tiny_model(kind: str = "bert", num_labels: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(kind, num_labels))
    with torch.no_grad():  # larger-than-default weights so that every head and filter matters
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_inputs(batch: int = 3, seq: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0  # one padded example
    return {"input_ids": ids, "attention_mask": mask}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 0), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


def save_tiny_model_dir(path: Path, kind: str = "bert", num_labels: int = 2, with_head: bool = True) -> Path:
    """A model directory like a user's fine-tuned checkpoint (tokenizer included)."""
    model = tiny_model(kind, num_labels)
    if not with_head:
        model = model.base_model
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_tiny_sst2(data_dir: Path, num_train: int = 96, num_dev: int = 32) -> Path:
    """A learnable SST-2-shaped task in `data_dir/glue/SST-2/{train,dev}.tsv`."""
    rng = random.Random(0)
    pos, neg = WORDS[:3], WORDS[3:6]
    task_dir = data_dir / "glue" / "SST-2"
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("dev", num_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = [rng.choice(WORDS[6:]) for _ in range(rng.randint(3, 8))] + [rng.choice(pos if label else neg)]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{label}")
        (task_dir / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return data_dir


def finetuned_tiny_sst2(root: Path, max_steps: int = 20) -> tuple[Path, Path]:
    """(data dir, checkpoint): the tiny SST-2 task and a tiny BERT fine-tuned on it through the CLI."""
    from compress.cli import main

    data = write_tiny_sst2(root / "data")
    save_tiny_model_dir(root / "base", "bert", with_head=False)
    ft = root / "ft"
    assert main(["finetune", "--model", str(root / "base"), "--task", "sst2", "--data-dir", str(data),
                 "-o", str(ft), "--max-steps", str(max_steps), "--learning-rate", "1e-3", "--batch-size", "16"]) == 0
    return data, ft
