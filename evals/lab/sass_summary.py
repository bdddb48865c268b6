"""Where a decode-step kernel's loads, stores and barriers sit around its PDL wait, in H100 machine code.

Compiles each kernel for sm90 with triton (no GPU needed; pointers 16-byte aligned, strides and the
GEMV's N and K multiples of 16, as a real launch at Gemma's shapes specializes them), disassembles the
cubin with the nvdisasm that ships with triton, and prints the order of global loads (LDG), cp.async
copies (LDGSTS), stores (STG), block barriers (BAR.SYNC), shuffles (SHFL) and the PDL wait (ACQBULK,
griddepcontrol.wait) as runs, e.g.
`LDG.E.128x12 ACQBULKx1 ... LDG.E.128x3 SHFL.BFLYx5 BAR.SYNCx1 ...`. A load that sits after a reduction's
barrier waits for it: one more round trip on the step's critical path (docs/kernels.md, "loads before the PDL wait").
Each line ends with the number of layout conversions (through shared memory) inside the kernel's loop,
the registers per thread (cuobjdump) and how many of its programs fit on one H100 SM at once (so a grid
of fewer than that times 132 programs runs as a single partial wave).

    python evals/lab/sass_summary.py                       # every kernel below
    python evals/lab/sass_summary.py --kernel norm_pair_settled decode_split
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

POINTERS = {"positions_ptr": "*i64", "slot_mapping_ptr": "*i64", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "count_ptr": "*i32", "part_ptr": "*fp32", "part_out_ptr": "*fp32",
            "part_lse_ptr": "*fp32", "cos_sin_ptr": "*fp32", "best_ptr": "*i64", "tokens_ptr": "*i64"}
EVENT = re.compile(r"\b(LDGSTS\S*|LDG\S*|STG\S*|BAR\.SYNC|SHFL\S*|ACQBULK|EXIT)\b")


def cases() -> dict:
    """name -> (kernel, constexprs, compile options) at Gemma-2-2B batch-1 decode shapes (the GEMVs: one
    per entry of gemv's config tables, named by kernel and weight shape)."""
    from compress.kernels import cache, decode, gemv, norm
    gemvs = {}
    for kernel, table, prefix in ((gemv.linear_small_m_kernel, gemv.LINEAR_CONFIGS, "linear"),
                                  (gemv.gelu_tanh_and_mul_gemv_kernel, gemv.GEGLU_CONFIGS, "geglu")):
        for (rows, n, k), c in table.items():
            gemvs[f"{prefix}_{n}x{k}_m{rows}"] = (kernel, dict(BLOCK_M=rows, BLOCK_N=c.block_n, BLOCK_K=c.block_k),
                                                 dict(num_warps=c.num_warps, num_stages=c.num_stages))
    decode_consts = dict(QUERIES_PER_KV=2, BLOCK_G=16, HEAD_DIM=256, BLOCK_D=256, BLOCK_SIZE=16, BLOCK_N=32,
                         NUM_SPLITS=64, USE_SOFTCAP=True, USE_WINDOW=True, UPCAST=False)
    return {
        "norm_pair": (norm.rms_norm_pair_kernel, dict(HIDDEN=2304, BLOCK_H=4096, RESIDUAL_SETTLED=False), {}),
        "norm_pair_settled": (norm.rms_norm_pair_kernel, dict(HIDDEN=2304, BLOCK_H=4096, RESIDUAL_SETTLED=True),
                              {}),
        "rotary_and_cache": (cache.rotary_and_cache_kernel, dict(NUM_Q_HEADS=8, BLOCK_SIZE=16, HALF=128,
                                                                 BLOCK_HALF=128, USE_QK_NORM=False),
                             dict(num_warps=2)),
        "decode_split": (decode.paged_decode_split_kernel, decode_consts, dict(num_stages=3)),
        "decode_reduce": (decode.paged_decode_reduce_kernel, dict(HEAD_DIM=256, BLOCK_D=64, BLOCK_N=32,
                                                                  NUM_SPLITS=64, BLOCK_S=64, USE_WINDOW=True), {}),
        **gemvs,
    }


def loop_conversions(kernel) -> int:
    """Layout conversions inside the kernel's first loop (TritonGPU IR): each goes through shared memory."""
    ir = kernel.asm["ttgir"]
    if "scf.for" not in ir:
        return 0
    body = ir[ir.index("scf.for"):]
    return body[:body.index("scf.yield")].count("ttg.convert_layout")


def compile_sm90(fn, consts: dict, options: dict, pdl: bool = True, types: dict | None = None):
    """`fn` compiled for an H100 with `consts` (USE_PDL and launch_pdl from `pdl`); the PDL tests read its PTX.
    Pointers are typed from POINTERS (else bf16) unless `types` names them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    consts = {**consts, "USE_PDL": pdl}

    def kind(name):
        if name in consts:
            return "constexpr"
        if name.endswith("_ptr"):
            return (types or {}).get(name) or POINTERS.get(name, "*bf16")
        return "fp32" if name in ("eps", "qk_scale", "softcap") else "i32"
    signature = {name: kind(name) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and (name.endswith("_ptr") or name.startswith("stride")
                                                    or name in ("N", "K", "I"))}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {**options, "launch_pdl": True} if pdl else options
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def cuda_tool(name: str) -> Path:
    """A CUDA binary that ships with triton (nvdisasm, cuobjdump)."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not tool.is_file():
        raise SystemExit(f"no {name} at {tool}: this triton ships without the CUDA binaries")
    return tool


# H100 per SM: 64K registers (allocated per warp in units of 256), 64 warps, 32 programs, 228 KiB of shared
# memory of which each program also reserves 1 KiB
SM90 = dict(regs=65536, reg_unit=256, warps=64, programs=32, shared=233472, shared_reserved=1024)


def on_cubin(kernel, tool: str, *flags: str) -> str:
    """The output of a triton-shipped CUDA tool run on the kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(cuda_tool(tool)), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def registers(kernel) -> int:
    """Registers per thread of the compiled kernel (cuobjdump -res-usage)."""
    return int(re.search(r"REG:(\d+)", on_cubin(kernel, "cuobjdump", "-res-usage")).group(1))


def programs_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Programs of `num_warps` warps, `regs` registers a thread and `shared` bytes resident on one H100 SM."""
    per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = SM90["regs"] // per_warp // num_warps
    by_shared = SM90["shared"] // (shared + SM90["shared_reserved"])
    return min(by_regs, SM90["warps"] // num_warps, SM90["programs"], by_shared)


def sass_events(kernel) -> list[str]:
    text = on_cubin(kernel, "nvdisasm", "-c")
    return [m.group(1) for line in text.splitlines() if (m := EVENT.search(line))]


def runs(events: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for event in events:
        if out and out[-1][0] == event:
            out[-1] = (event, out[-1][1] + 1)
        else:
            out.append((event, 1))
    return out


def main(argv=None) -> int:
    table = cases()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", nargs="+", choices=sorted(table), default=sorted(table))
    args = parser.parse_args(argv)
    for name in args.kernel:
        fn, consts, options = table[name]
        kernel = compile_sm90(fn, consts, options)
        regs = registers(kernel)
        fit = programs_per_sm(regs, kernel.metadata.num_warps, kernel.metadata.shared)
        print(f"{name}: " + " ".join(f"{e}x{n}" for e, n in runs(sass_events(kernel)))
              + f" | layout conversions in the loop: {loop_conversions(kernel)}"
              + f" | {regs} registers, {fit} programs/SM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
