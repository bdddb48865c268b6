"""Recovery of a pruned model by knowledge distillation from its dense parent (`compress distill`).

For a Gemma, config.py holds the settings (one dataclass, validated); data.py the token windows (calibration
text, then text the teacher samples itself when the text runs short); loss.py the KL to the teacher's next-token
distribution, chunked over positions; state.py the checks of teacher and student and the checkpoint (always
complete, resumable); trainer.py the loop (bf16 on the GPU, progress with tokens/s, held-out evaluation).
A slimmed sentence-embedding encoder learns its parent's pooled embeddings instead: embed_config.py (its
settings) and embedding.py (loss, passages, loop and output).
"""
