"""The launches a batch-1 decode step saved per layer, timed old vs new on the GPU (docs/kernels.md).

Gemma-2-2B shapes (8 query / 4 KV heads, head_dim 256, 26 layers) and Gemma-3-1B (4 / 1, QK-norm):
- rope+cache: rotary_embedding + reshape_and_cache (Gemma 3: plus the two QK rms_norm launches) vs
  the fused rotary_and_cache, one token;
- PDL (GPU with sm90+ only): the kernels of 4 Gemma-2-2B decode layers back to back
  (kernels.testing.decode_layer_chain: qkv, rotary_and_cache, decode split + reduce, o_proj, norm pair,
  gate_up, down, norm pair) launched plainly (`pdl=False`, kernels/options.py) vs with Programmatic
  Dependent Launch (`pdl=True`); 4 layers of weights (620 MB) stream from DRAM as in a real step, and
  the per-step column scales by 26 / 4.
With `--ablate` it times that chain (PDL on, block tables as wide as the engine's) once whole and once
without each kind of launch in turn (kernels.testing.CHAIN_KERNELS; the result is then meaningless, the
other launches unchanged): what each kernel costs inside the chain, per layer and per 26-layer step.
Each pair is first checked to give the same result; times are medians of CUDA-graph replays holding 10
calls each (evals/bench_kernels.time_ms), the way the engine replays a decode step. The last column
multiplies the saving by the layer count: what one decode step should gain. The split-K GEMVs are
timed by `evals/bench_gemv.py --sweep` instead (they need weights rotated past L2). The decode rows
(split + reduce vs an in-kernel merge) went with the merge, measured slower and removed (docs/kernels.md).

  python evals/lab/bench_batch1.py [--iters 50]          # GPU; without CUDA it runs the checks only
  python evals/lab/bench_batch1.py --ablate [--iters 30]  # GPU: each kernel's share of the chain
  python evals/lab/bench_batch1.py --ablate attention     # GPU: the chain whole and without attention
  python evals/lab/bench_batch1.py --ablate attention --decode-config 16,4,2,2   # ... with this attention config
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from compress.kernels import cache, norm, using_options  # noqa: E402
from compress.kernels.common import device_supports_pdl  # noqa: E402
from compress.kernels.options import parse_decode_config  # noqa: E402
from compress.kernels.testing import (CHAIN_KERNELS, DecodeChainShape, decode_layer_chain,  # noqa: E402
                                      relative_error)

MODELS = {"gemma-2-2b": (8, 4, False, 26), "gemma-3-1b": (4, 1, True, 26)}   # Hq, Hkv, QK-norm, layers
HEAD_DIM, BLOCK_SIZE, MAX_POSITION = 256, 16, 8192
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rope_cache_pair(num_q: int, num_kv: int, qk_norm: bool):
    """(old, new) callables over the same single-token inputs; each leaves q and the caches written."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, (num_q + 2 * num_kv) * HEAD_DIM, generator=gen).to(DEVICE, torch.bfloat16)
    q, k, v = (t.view(1, -1, HEAD_DIM) for t in qkv.split([num_q * HEAD_DIM, num_kv * HEAD_DIM,
                                                           num_kv * HEAD_DIM], -1))
    caches = [torch.zeros(64, BLOCK_SIZE, num_kv, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)]
    slot = torch.tensor([517], device=DEVICE)
    positions = torch.tensor([700], device=DEVICE)
    angles = torch.arange(MAX_POSITION, device=DEVICE)[:, None] * torch.rand(HEAD_DIM // 2, device=DEVICE)
    table = torch.cat((angles.cos(), angles.sin()), -1).contiguous()
    w = [torch.randn(HEAD_DIM, device=DEVICE) * 0.1 for _ in range(2)] if qk_norm else []
    q_old, q_new, k_old = q.clone(), q.clone(), k.clone()

    # timed calls work in place (a repeated rotation or norm changes values, not the work); the
    # check restarts both from the same q and k
    def old():
        if qk_norm:
            norm.rms_norm(q_old, w[0], 1e-6, out=q_old), norm.rms_norm(k_old, w[1], 1e-6, out=k_old)
        norm.rotary_embedding(positions, q_old, k_old, table)
        cache.reshape_and_cache(k_old, v, caches[0], caches[1], slot)

    def new():
        cache.rotary_and_cache(positions, q_new, k, v, caches[2], caches[3], slot, table, *w, eps=1e-6)

    def check():
        q_old.copy_(q), q_new.copy_(q), k_old.copy_(k)
        old(), new()
        return max(relative_error(q_new, q_old), relative_error(caches[2], caches[0]),
                   relative_error(caches[3], caches[1]))
    return old, new, check


def pdl_chain_pair(num_layers: int):
    """The decode kernels of `num_layers` layers, launched plainly vs with PDL (same outputs)."""
    run = decode_layer_chain(num_layers, device=DEVICE)
    torch.cuda.synchronize()                # PDL kernels read weights before waiting: written by now

    def launch(pdl: bool):
        with using_options(pdl=pdl):        # read at launch: each graph captures its own
            return run()[0]

    def check():
        off = launch(False).clone()
        return relative_error(launch(True), off)
    return (lambda: launch(False)), (lambda: launch(True)), check


def cases():
    for model, (num_q, num_kv, qk_norm, layers) in MODELS.items():
        yield f"{model} rope+cache{' +QK-norm' if qk_norm else ''}", layers, rope_cache_pair(num_q, num_kv, qk_norm)
    if torch.cuda.is_available() and device_supports_pdl(torch.cuda.current_device()):
        yield "gemma-2-2b 4-layer chain, PDL off vs on", 26 / 4, pdl_chain_pair(4)


ABLATE_LAYERS = 4
ABLATIONS = [()] + [(name,) for name in CHAIN_KERNELS] + [("rope", "attention", "norm")]


def ablate(iters: int, kinds: list[str], table_blocks: int = 128) -> None:
    """The PDL chain whole, then without each kind of launch (or those of `kinds`): the time each costs
    inside the chain."""
    from bench_kernels import time_ms
    shape = DecodeChainShape(table_blocks=table_blocks)
    print(f"gemma-2-2b decode chain, {ABLATE_LAYERS} layers, PDL on, block tables {table_blocks} wide")
    print("| left out | chain (us) | per layer (us) | saved per layer (us) | x 26 layers (us) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    whole = None
    for omit in [()] + [(k,) for k in kinds] if kinds else ABLATIONS:
        run = decode_layer_chain(ABLATE_LAYERS, shape, device=DEVICE, omit=omit)
        torch.cuda.synchronize()
        t = time_ms(lambda chain=run: chain()[0], iters) * 1e3
        whole = t if whole is None else whole
        saved = (whole - t) / ABLATE_LAYERS
        print(f"| {' + '.join(omit) or 'nothing'} | {t:.2f} | {t / ABLATE_LAYERS:.2f} | {saved:.2f} | "
              f"{saved * 26:.1f} |", flush=True)
        del run
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--ablate", nargs="*", choices=CHAIN_KERNELS, default=None, metavar="KERNEL",
                        help="time the PDL chain without each kernel in turn (or only without those named: "
                             f"{', '.join(CHAIN_KERNELS)})")
    parser.add_argument("--decode-config", type=parse_decode_config, default=None, metavar="BN,WARPS,STAGES,PER_SM",
                        help="launch decode attention with this config instead of the tuned ones (kernels/decode.py)")
    args = parser.parse_args(argv)
    with using_options(decode_config=args.decode_config):
        return bench(args)


def bench(args) -> int:
    timing = torch.cuda.is_available()
    if args.ablate is not None:
        if not timing:
            raise SystemExit("--ablate times kernels: it needs a CUDA device")
        with using_options(pdl=True):
            ablate(args.iters, args.ablate)
        return 0
    if timing:
        from bench_kernels import time_ms
    print("| case | old (us) | new (us) | saved (us) | x layers = per step (us) | rel. diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, layers, (old, new, check) in cases():
        err = check()
        if err > 1e-2:
            raise RuntimeError(f"{label}: old and new differ by {err:.2e}")
        if not timing:
            print(f"| {label} | - | - | - | - | {err:.1e} |")
            continue
        t_old, t_new = (time_ms(fn, args.iters) * 1e3 for fn in (old, new))
        saved = t_old - t_new
        print(f"| {label} | {t_old:.2f} | {t_new:.2f} | {saved:.2f} | {saved * layers:.1f} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
