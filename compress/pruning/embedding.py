"""The embedding objective of the encoder family: label-free pruning of sentence-embedding models.

`compress prune --model minilm --objective embedding --flops 0.5 --calib TEXT -o DIR` prunes the model
for the embeddings it serves (compress.embeddings: its pooling and normalisation) rather than for a
task head. Stage by stage, what differs from the task objective (compress.pruning.encoder):
- load: the bare encoder, head or not (its pooling is read from the directory);
- calibrate: `num_samples` text passages (compress.embeddings.calib), truncated to `max_seq_length`
  (default 128) and batched by length, no labels;
- score: the Fisher of the distillation loss between the masked and the dense model's embeddings
  (compress.pruning.embed_scores);
- around it, with `eval`: STS-B cosine Spearman when a data directory has STS-B, else BBC News
  nearest-neighbour accuracy (compress.embeddings.evaluate).
Search, rearrangement, tuning (least squares against the dense model's hidden states, which needs no
labels) and slimming are the encoder family's; the output keeps the parent's pooling files
(compress.models.checkpoint.save), so `compress serve` embeds exactly as the parent did.
"""

from __future__ import annotations

from compress.pruning.encoder import EncoderFamily

DEFAULT_NUM_SAMPLES = 1024
DEFAULT_MAX_SEQ_LENGTH = 128


class EmbeddingFamily(EncoderFamily):
    def task_name(self, config) -> str:
        return "embeddings (label-free)"

    def check_inputs(self, config) -> None:
        from compress.data.calib import NAMED_CORPORA, read_text

        if config.calib and config.calib not in NAMED_CORPORA:
            read_text(config.calib)

    def load(self, config, device):
        from compress.embeddings.model import load_embedder
        from compress.models import checkpoint

        path = checkpoint.resolve(config.model)
        embedder, tokenizer = load_embedder(path, device)
        self.pooling = embedder.pooling
        return embedder.encoder, tokenizer, path

    def calibrate(self, config, model, tokenizer, progress: bool):
        from compress.data import batching
        from compress.embeddings import calib
        from compress.embeddings.model import max_length
        from compress.pruning.stages import Calibration

        docs, source = calib.documents(config.calib, config.data_dir)
        texts = calib.passages(docs, config.num_samples or DEFAULT_NUM_SAMPLES, config.seed)
        limit = max_length(model.config, self.pooling)
        features = batching.encode(tokenizer, [(t, None, 0.0) for t in texts],
                                   min(config.max_seq_length or DEFAULT_MAX_SEQ_LENGTH, limit))
        features.sort(key=lambda f: len(f["input_ids"]))  # batches of like lengths: little padding
        batches = [{k: v for k, v in b.items() if k != "labels"}
                   for b in batching.batches(features, config.batch_size, batching.pad_id_of(tokenizer))]
        return Calibration(batches, batching.mean_length(features), len(features), f"passages of {source}")

    def score(self, config, model, adapter, calib, device, masks, progress, record, label=""):
        from compress.embeddings.model import Embedder
        from compress.pruning.embed_scores import embedding_gradients
        from compress.pruning.fisher import fisher_diagonal
        from compress.pruning.stages import Scores

        grads = embedding_gradients(Embedder(model, self.pooling), adapter, calib.batches, device, progress, masks,
                                    label, seed=config.seed)
        return Scores(*map(fisher_diagonal, grads), *grads)

    def _evaluate(self, pipe, model, tokenizer) -> dict:
        from compress.embeddings import evaluate
        from compress.embeddings.model import Embedder

        return evaluate.default_check(Embedder(model, self.pooling), tokenizer, pipe.config.data_dir, pipe.device,
                                      progress=pipe.progress)
