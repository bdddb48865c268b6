"""Encoder serving (serve/encoder/) on tiny seeded encoders of every adapter, over real HTTP.

Embeddings equal `compress.load`'s model pooled as the directory says (each input run alone, so the
batching and padding are checked too); `/classify` equals the model's own logits; a slimmed model
embeds as its masked parent; a token-pruned checkpoint serves what its token-dropping forward computes;
the `openai` client works unchanged; every bad input is a 4xx with an OpenAI error body, after which
the server still serves.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from _tiny import KINDS, WORDS
from encoder_fixtures import KEY, ServerThread, request, st_dir

TEXTS = ["good movie", "not really a great film at all", "awful", " ".join(WORDS), "the plot was fine"]


def pooled_alone(path, texts, token_pruned=False):
    """Reference embeddings: each text through compress.load's model alone, pooled by the directory's config."""
    import compress
    from compress.embeddings.pooling import read_pooling
    from compress.models.checkpoint import load_tokenizer

    model, tok, pooling = compress.load(path), load_tokenizer(path), read_pooling(path)
    rows = []
    for text in texts:
        batch = tok(text, return_tensors="pt")
        with torch.no_grad():
            if token_pruned:
                hidden, kept, *_ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
                rows.append(pooling.pool(hidden, kept)[0])
            else:
                hidden = model.base_model(**batch).last_hidden_state
                rows.append(pooling.pool(hidden, batch["attention_mask"])[0])
    return torch.stack(rows)


def logits_alone(path, texts, token_pruned=False):
    import compress
    from compress.models.checkpoint import load_tokenizer

    model, tok = compress.load(path), load_tokenizer(path)
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in tok(t, return_tensors="pt").items()}).logits for t in texts])


def embed_over_http(port, texts, fmt="float"):
    status, body = request(port, "POST", "/v1/embeddings", {"model": "tiny", "input": texts, "encoding_format": fmt})
    assert status == 200, body
    if fmt == "base64":
        return torch.tensor(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]]))
    return torch.tensor([d["embedding"] for d in body["data"]])


@pytest.mark.parametrize("kind, pooling", [("bert", "mean"), ("distilbert", "cls"), ("roberta", "max"),
                                           ("mpnet", "mean")])
def test_embeddings_equal_the_loaded_model_pooled(tmp_path, kind, pooling):
    from serve import Encoder

    path = st_dir(tmp_path / kind, kind, pooling, normalize=kind != "roberta")
    with ServerThread(Encoder(str(path), max_num_batched_tokens=32)) as port:  # several batches
        for fmt in ("float", "base64"):
            torch.testing.assert_close(embed_over_http(port, TEXTS, fmt), pooled_alone(path, TEXTS),
                                       atol=1e-5, rtol=1e-4)
        status, body = request(port, "POST", "/v1/embeddings", {"model": "tiny", "input": "good"})
        assert body["usage"]["prompt_tokens"] == 3 and body["data"][0]["index"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_classify_equals_the_model_logits(tmp_path, kind):
    from serve import Encoder

    path = st_dir(tmp_path / kind, kind, pooling=None, with_head=True, num_labels=3)
    with ServerThread(Encoder(str(path))) as port:
        status, body = request(port, "POST", "/classify", {"model": "tiny", "input": TEXTS})
        assert status == 200, body
        probs = torch.tensor([d["probs"] for d in body["data"]])
        torch.testing.assert_close(probs, logits_alone(path, TEXTS).softmax(-1), atol=1e-5, rtol=1e-4)
        assert [d["label"] for d in body["data"]] == [f"LABEL_{int(p.argmax())}" for p in probs]
        assert body["data"][0]["num_classes"] == 3


def test_regression_head_gives_its_score(tmp_path):
    from serve import Encoder

    path = st_dir(tmp_path / "reg", "bert", pooling=None, with_head=True, num_labels=1)
    with ServerThread(Encoder(str(path))) as port:
        status, body = request(port, "POST", "/classify", {"model": "tiny", "input": TEXTS[:2]})
    expected = logits_alone(path, TEXTS[:2])[:, 0]
    assert status == 200 and body["data"][0]["label"] is None
    torch.testing.assert_close(torch.tensor([d["score"] for d in body["data"]]), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_slimmed_model_embeds_as_its_masked_parent(tmp_path, kind):
    from compress.arch import get_adapter
    from compress.embeddings.model import load_embedder
    from compress.models import checkpoint
    from compress.pruning.slim import slim_model
    from serve import Encoder

    parent = st_dir(tmp_path / "parent", kind, "mean")
    embedder, tok = load_embedder(parent)
    adapter = get_adapter(embedder.encoder)
    heads = [torch.tensor([1.0, 0, 1, 0]), torch.tensor([0.0, 0, 0, 0])]
    filters = [(torch.arange(128) % 3 != 0).float(), (torch.arange(128) % 2 == 0).float()]
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), adapter.masks(heads, filters):
        masked = embedder(**batch)
    slim_model(adapter, heads, filters, filter_multiple=8)
    checkpoint.save(embedder.encoder, tok, tmp_path / "slim", source_dir=parent)
    with ServerThread(Encoder(str(tmp_path / "slim"))) as port:
        torch.testing.assert_close(embed_over_http(port, TEXTS), masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_token_pruned_serving_equals_its_forward(tmp_path, kind):
    from compress.models.checkpoint import load, load_tokenizer
    from compress.token_pruning import PruningSpec, TokenPruningModel, checkpoint
    from serve import Encoder

    parent = st_dir(tmp_path / "parent", kind, "mean", with_head=True)
    model = TokenPruningModel(load(parent), PruningSpec("threshold", [0.08], [], 1e-3)).eval()
    checkpoint.save(model, load_tokenizer(parent), tmp_path / "ltp", {}, source_dir=parent)
    with ServerThread(Encoder(str(tmp_path / "ltp"), max_num_batched_tokens=40)) as port:
        status, body = request(port, "POST", "/classify", {"model": "tiny", "input": TEXTS})
        probs = torch.tensor([d["probs"] for d in body["data"]])
        torch.testing.assert_close(probs, logits_alone(tmp_path / "ltp", TEXTS, True).softmax(-1), atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(embed_over_http(port, TEXTS), pooled_alone(tmp_path / "ltp", TEXTS, True),
                                   atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        out = model(**load_tokenizer(parent)(TEXTS[3], return_tensors="pt"))
    assert out.num_tokens[0, -1] < out.num_tokens[0, 0]  # tokens were dropped for real


def test_token_budget_batches():
    from serve.encoder.batching import padded_tokens, plan

    lengths = [5, 30, 7, 8, 31, 2, 16, 16, 3]
    batches = plan(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 for b in batches)
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert padded_tokens(lengths, batches) <= sum(lengths) + 40


def test_serve_routes_an_encoder_to_the_encoder_engine(tmp_path, monkeypatch):
    import serve.encoder.server
    from compress.cli import main

    seen = {}
    monkeypatch.setattr(serve.encoder.server, "serve_forever", lambda encoder, *args: seen.update(e=encoder, a=args))
    path = st_dir(tmp_path / "m", "bert", "mean")
    assert main(["serve", str(path), "--max-num-batched-tokens", "64", "--max-model-len", "16"]) == 0
    assert seen["a"][0] == "m" and seen["e"].max_model_len == 16 and seen["e"].config.max_num_batched_tokens == 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from serve import Encoder

    path = st_dir(tmp_path_factory.mktemp("m") / "tiny", "bert", "mean", with_head=False)
    encoder = Encoder(str(path), max_num_inputs=8)
    with ServerThread(encoder) as port:
        yield port, encoder


def test_openai_client_embeddings_create(served):
    openai = pytest.importorskip("openai")
    port, encoder = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    result = client.embeddings.create(model="tiny", input=TEXTS[:3])  # the client asks for base64
    got = torch.tensor([d.embedding for d in result.data])
    torch.testing.assert_close(got, encoder.embed(TEXTS[:3]), atol=1e-6, rtol=1e-5)
    assert result.usage.prompt_tokens == sum(len(encoder.tokenize([t])[0]) for t in TEXTS[:3])
    assert [m.id for m in client.models.list()] == ["tiny"]


BAD = {
    "empty list": ({"model": "tiny", "input": []}, 400),
    "non-string item": ({"model": "tiny", "input": ["good", 3]}, 400),
    "nested non-string": ({"model": "tiny", "input": [{"text": "good"}]}, 400),
    "only whitespace": ({"model": "tiny", "input": "  \n\t"}, 400),
    "over the batch limit": ({"model": "tiny", "input": ["good"] * 9}, 400),
    "over the token limit": ({"model": "tiny", "input": "good " * 40}, 400),
    "unknown model": ({"model": "gpt-17", "input": "good"}, 404),
    "missing input": ({"model": "tiny"}, 400),
    "missing model": ({"input": "good"}, 400),
    "bad encoding format": ({"model": "tiny", "input": "good", "encoding_format": "int8"}, 400),
    "wrong dimensions": ({"model": "tiny", "input": "good", "dimensions": 32}, 400),
    "token id out of vocabulary": ({"model": "tiny", "input": [[5, 6, 10_000]]}, 400),
    "truncate not a bool": ({"model": "tiny", "input": "good", "truncate": "yes"}, 400),
    "not an object": ([1, 2], 400),
    "malformed json": (b'{"model": "tiny", "input": "good"', 400),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_4xx_and_the_server_keeps_serving(served, case):
    port, _ = served
    body, expected = BAD[case]
    raw = body if isinstance(body, bytes) else None
    status, data = request(port, "POST", "/v1/embeddings", None if raw else body, raw=raw)
    assert status == expected, data
    assert data["error"]["message"] and data["error"]["type"]
    assert request(port, "POST", "/v1/embeddings", {"model": "tiny", "input": "good"})[0] == 200


@pytest.mark.parametrize("path, body", [("/v1/completions", {"model": "tiny", "prompt": "good"}),
                                        ("/v1/chat/completions", {"model": "tiny", "messages": []}),
                                        ("/classify", {"model": "tiny", "input": "good"}),
                                        ("/v1/nothing", {})])
def test_what_an_embedding_model_does_not_serve_is_4xx(served, path, body):
    status, data = request(served[0], "POST", path, body)
    assert 400 <= status < 500 and data["error"]["message"], data


def test_truncation_when_asked_and_auth(served):
    port, encoder = served
    status, body = request(port, "POST", "/v1/embeddings", {"model": "tiny", "input": "good " * 40, "truncate": True})
    assert status == 200 and body["usage"]["prompt_tokens"] == encoder.max_model_len == 32
    assert request(port, "POST", "/v1/embeddings", {"model": "tiny", "input": "good"}, key="wrong")[0] == 401
    assert request(port, "GET", "/health", key=None)[0] == 200
    status, text = request(port, "GET", "/metrics", key=None)
    assert status == 200 and "serve_encoder_inputs_total" in text


def test_body_limits_413_and_408_and_the_server_keeps_serving(tmp_path):
    """The decoder server's body limits hold here too: a body over the cap is 413 before it is read, half
    a body that stops arriving is 408 within the timeout and its connection is closed."""
    import sys
    from pathlib import Path

    from serve.context import ServerLimits
    from serve.encoder import Encoder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from evals.loopback import send_raw

    encoder = Encoder(str(st_dir(tmp_path / "m", "bert", "mean")))
    with ServerThread(encoder, limits=ServerLimits(max_body_bytes=4096, body_timeout_s=1.0)) as port:
        status, body = request(port, "POST", "/v1/embeddings", {"model": "tiny", "input": ["word " * 2000]})
        assert status == 413 and "larger than 4096 bytes" in body["error"]["message"], body
        head = ("POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n" '{"model": ').encode()
        reply = send_raw(port, head, timeout=20)
        assert reply.status == 408 and reply.seconds < 5, (reply.status, reply.seconds, reply.error)
        assert len(embed_over_http(port, TEXTS[:2])) == 2


def test_startup_says_mean_pooling_without_a_config(tmp_path):
    from serve import Encoder
    from serve.encoder.server import startup_lines

    encoder = Encoder(str(st_dir(tmp_path / "bare", "bert", pooling=None)))
    assert "mean pooling (the default: no sentence-transformers pooling config)" in startup_lines(encoder, "t", "h", 1)[1]


@pytest.mark.parametrize("token_pruned", [False, True])
def test_forwards_run_without_cudnn_attention(tmp_path, monkeypatch, token_pruned):
    """cuDNN's SDPA builds a graph per new shape; the engine's forwards (embed and classify) run without it."""
    from compress.models.checkpoint import load, load_tokenizer
    from compress.token_pruning import PruningSpec, TokenPruningModel, checkpoint
    from serve import Encoder

    path = st_dir(tmp_path / "m", "bert", "mean", with_head=True, num_labels=2)
    if token_pruned:
        model = TokenPruningModel(load(path), PruningSpec("threshold", [0.08], [], 1e-3)).eval()
        checkpoint.save(model, load_tokenizer(path), tmp_path / "tp", {}, source_dir=path)
        path = tmp_path / "tp"
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    encoder = Encoder(str(path))
    encoder.embed(TEXTS)
    encoder.classify(TEXTS)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored outside the forwards
