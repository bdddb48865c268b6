"""Where the encoder engine's time goes: tokenization against forwards, repeated runs (warm-up effects),
and the top operators of one run by device and by host time, for staged encoder shapes with random
weights (evals/bench_embed.py's workload and models). `--cudnn-ab` also times the runs with cuDNN's
attention allowed back into the SDPA choices (serve/encoder/model.py leaves it out).

  PYTHONPATH=. python3 evals/lab/embed_profile.py --stage evals/bench_embed_stage --models minilm minilm-slim
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from bench_embed import materialize, workload  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="evals/bench_embed_stage")
    p.add_argument("--models", nargs="+", default=["minilm", "minilm-slim"])
    p.add_argument("--num-texts", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/tmp/embed_profile")
    p.add_argument("--cudnn-ab", action="store_true", help="also time embed runs with cuDNN attention allowed")
    p.add_argument("--classify", action="store_true", help="also time the same inputs through a 2-label head")
    p.add_argument("--st", action="store_true", help="also time sentence-transformers' encode (batch 512) twice")
    args = p.parse_args(argv)
    from compress.models.checkpoint import load_tokenizer
    from serve import Encoder
    from serve.encoder import batching

    staged = json.loads((Path(args.stage) / "stage.json").read_text())
    for name in args.models:
        family = staged[name]["parent"] or name
        path = materialize(Path(args.stage) / name, Path(args.stage) / family, Path(args.work) / name, head=False)
        texts = workload(load_tokenizer(Path(args.stage) / family), args.num_texts, 8, 256)
        encoder = Encoder(str(path))
        found: dict = {}
        found["tokenize_s"] = timed(lambda: found.setdefault("ids", encoder.tokenize(texts)))
        ids = found.pop("ids")
        lengths = [len(i) for i in ids]
        plan = batching.plan(lengths, encoder.config.max_num_batched_tokens)
        found.update(batches=len(plan), tokens=sum(lengths), padded=batching.padded_tokens(lengths, plan))
        found["run_s"] = [round(timed(lambda: encoder.run("embed", ids)), 3) for _ in range(args.repeats)]
        if args.cudnn_ab:
            from torch.nn.attention import SDPBackend

            from serve.encoder import model as encoder_model
            chosen = encoder_model.SDPA_BACKENDS
            encoder_model.SDPA_BACKENDS = chosen + [SDPBackend.CUDNN_ATTENTION]
            found["run_with_cudnn_s"] = [round(timed(lambda: encoder.run("embed", ids)), 3)
                                         for _ in range(args.repeats)]
            encoder_model.SDPA_BACKENDS = chosen
        collate = [batching.collate([ids[i] for i in b], 0, encoder._token_types, encoder.model.device) for b in plan]
        found["collate_s"] = timed(lambda: [batching.collate([ids[i] for i in b], 0, encoder._token_types,
                                                             encoder.model.device) for b in plan])
        found["forward_only_s"] = timed(lambda: [encoder.model.embed(b) for b in collate])
        if args.classify:
            cls_path = materialize(Path(args.stage) / name, Path(args.stage) / family, Path(args.work) / f"{name}-cls",
                                   head=True)
            classifier = Encoder(str(cls_path))
            found["classify_run_s"] = [round(timed(lambda: classifier.run("classify", ids)), 3)
                                       for _ in range(args.repeats)]
        print(name, json.dumps(found), flush=True)
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            encoder.run("embed", ids)
            sync()
        averages = prof.key_averages()
        if torch.cuda.is_available():
            print(averages.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
        if args.st and staged[name]["parent"] is None:
            from sentence_transformers import SentenceTransformer
            model = SentenceTransformer(str(path), device="cuda" if torch.cuda.is_available() else "cpu").half()
            print(name, "sentence-transformers s:", [round(timed(lambda: model.encode(texts, batch_size=512)), 3)
                                                     for _ in range(2)], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
