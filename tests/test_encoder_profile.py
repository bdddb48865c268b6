"""evals/lab/encoder_profile.py off the GPU: kernel names from an H100 profile land in the right kinds, and the
table's ratios come from the numbers it is given."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals" / "lab"))

import encoder_profile as ep  # noqa: E402

H100_KERNELS = {  # names as torch.profiler reported them for MPNet-base at batch 32
    "nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>": "gemm",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64": "attention",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "layernorm",
    "void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::Tensor)>": "gelu",
    "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16> >": "add",
    "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long)": "other",
    "add_layer_norm_kernel": "layernorm",
}


def test_kernel_kinds():
    assert {name: ep.kernel_kind(name) for name in H100_KERNELS} == H100_KERNELS


def test_markdown_ratios():
    def row(replay, **us):
        return dict(replay_ms=replay, kernels={k: (us.get(k, 0.0), 1.0) for k in ep.KINDS})
    result = dict(model="m", variant="v", heads=[1], filters=[8], seq=128, device="gpu", torch="x", command="c",
                  batches={32: {"dense": row(2.0, gemm=1200, attention=300, gelu=200, layernorm=260),
                                "slim": row(1.6, gemm=800, attention=200, gelu=100, layernorm=260)}})
    md = ep.markdown(result)
    assert "**1.25x**" in md                      # replay 2.0 / 1.6
    assert "1700 / 1100 us = **1.55x**" in md     # gemm + attention + gelu only
    assert "| layernorm | 260 | 1 | 260 | 1 | 1.00x |" in md


def test_parse_args_has_every_flag_time_shape_reads():
    """profile_model hands its args to encoder_latency.time_shape: they share the timing flags."""
    args = ep.parse_args([])
    assert (args.seq, args.batches, args.trials, args.replays, args.warmup, args.filter_multiple,
            args.cuda_dtype) == (128, [32, 1], 10, 20, 3, 8, "bfloat16")
    assert ep.parse_args(["--cuda-dtype", "float32"]).cuda_dtype == "float32"
