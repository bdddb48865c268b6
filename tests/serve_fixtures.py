"""Tiny seeded random Gemma 2 / Gemma 3 checkpoints (HF format) for the serving tests.

Each model directory holds model.safetensors, config.json and a small byte-level BPE tokenizer with
Gemma's special ids (pad 0, eos 1, bos 2) and a chat template, so the engine and the server load it
exactly like a real model. Weights are drawn larger than HF's init (embeddings smaller) so greedy outputs vary
instead of repeating one token, and Gemma 2's soft-caps are small enough to change the attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
WINDOW = 8
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
         "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 emoji", "0123456789 serving paged attention"] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:], chat_template=CHAT_TEMPLATE)


def _common(num_layers: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                query_pre_attn_scalar=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                bos_token_id=2, attn_implementation="eager")


def gemma2_config(num_layers: int = 4):
    from transformers import Gemma2Config
    return Gemma2Config(**_common(num_layers), attn_logit_softcapping=3.0, final_logit_softcapping=2.0)


def gemma3_config(num_layers: int = 4):
    from transformers import Gemma3TextConfig
    types = ["sliding_attention", "sliding_attention", "full_attention"] * num_layers
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    return Gemma3TextConfig(**_common(num_layers), layer_types=types[:num_layers], rope_parameters=rope)


def random_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.3 if "norm" in name else 0.02 if "embed" in name else 0.15
            param.copy_(torch.randn_like(param) * std)
    return model


def save_model(model, path: Path, tokenizer=None, extra_config: dict | None = None) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    (tokenizer or build_tokenizer()).save_pretrained(path)
    if extra_config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(extra_config)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face `generate` (greedy, EOS not special) -> the new token ids."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=0)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB, (n,), generator=g).tolist() for n in lengths]
