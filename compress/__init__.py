"""compress: post-training pruning of transformers into smaller dense models, and a runtime to serve them.

`import compress` stays light: the API functions import torch and transformers only when called.
"""

from compress.api import evaluate, finetune, load, prune

__all__ = ["prune", "finetune", "load", "evaluate"]
__version__ = "0.1.0"
