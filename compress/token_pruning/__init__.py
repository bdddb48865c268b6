"""Learned token pruning for BERT-family encoders (Kim et al., "Learned Token Pruning for
Transformers", KDD 2022), with real token dropping at inference.

- `model.py`: the encoder forward that prunes tokens after each layer (soft / masked / drop modes);
- `parts.py`: embeddings, task head, MPNet position bias (layers come from `compress.arch`);
- `flops.py`: per-example FLOPs from the kept lengths (the head/filter pruner's cost terms);
- `trainer.py`: soft stage (thresholds learned, own optimizer) and hard stage (thresholds frozen);
- `pipeline.py`: `token_prune(config)` (the `compress token-prune` command) and evaluation;
- `checkpoint.py`: checkpoints = the slimmed-checkpoint contract + config.json["token_pruning"].
"""

from compress.token_pruning.config import TokenPruningConfig
from compress.token_pruning.checkpoint import is_token_pruned, load
from compress.token_pruning.model import PruningSpec, TokenPruningModel
from compress.token_pruning.pipeline import evaluate_dir, token_prune

__all__ = ["TokenPruningConfig", "PruningSpec", "TokenPruningModel", "evaluate_dir", "is_token_pruned", "load",
           "token_prune"]
