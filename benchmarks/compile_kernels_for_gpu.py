"""Compile every Triton kernel specialisation the launchers would use on a GPU, for an NVIDIA target, on a machine
with no GPU; report registers and local memory (spills, from cuobjdump) and compile time.

The CPU test suite runs the kernels under Triton's interpreter, which accepts code the GPU compiler rejects
(e.g. a constexpr re-assigned in a loop) and says nothing about register pressure. This closes that gap.

    env -u TRITON_INTERPRET python benchmarks/compile_kernels_for_gpu.py [--arch 90] [--dtypes fp32,bf16]
"""

import argparse
import os
import re
import subprocess
import tempfile
import time

import _common
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

dwconv = _common.import_package_module("kernels_cabs_dwconv_block")
ln_residual = _common.import_package_module("kernels_cabs_ln_residual_silu")
adaptive_pool = _common.import_package_module("kernels_cabs_adaptive_pool")
common = _common.import_package_module("kernels_common")
msda = _common.import_package_module("kernels_msda")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int32: "*i32",
}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def arg_type(a):
    if isinstance(a, torch.Tensor):
        return POINTER_TYPES[a.dtype]
    if isinstance(a, int):
        return "i32" if abs(a) < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {type(a)}")


def resource_usage(cubin):
    """(registers, local-memory bytes per thread: spills) of the kernel, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return int(regs.group(1)) if regs else -1, int(local.group(1)) if local else -1


class CompileOnlyLauncher:
    """Stands in for `kernel[grid]`: compiles the specialisation the call asks for instead of launching it."""

    seen = set()

    def __init__(self, fn, arch):
        self.fn, self.arch = fn, arch

    def __call__(self, *args, num_warps=4, **constexprs):
        signature = {name: arg_type(a) for name, a in zip(self.fn.arg_names, args)}
        signature.update({name: "constexpr" for name in constexprs})
        key = (self.fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()), num_warps)
        if key in self.seen:
            return
        self.seen.add(key)
        start = time.time()
        kernel = triton.compile(
            triton.compiler.ASTSource(self.fn, signature, constexprs),
            target=GPUTarget("cuda", self.arch, 32),
            options={"num_warps": num_warps},
        )
        seconds = time.time() - start
        regs, spills = resource_usage(kernel.asm["cubin"])
        io_dtype = next(t for t in signature.values() if t.startswith("*"))[1:]
        shown = {k: v for k, v in constexprs.items() if k != "CT"}
        print(
            f"{self.fn.__name__:46s} {io_dtype:5s} warps={num_warps} regs={regs:3d} spill={spills:5d}B "
            f"{seconds:5.1f}s  {shown}",
            flush=True,
        )


def launch_everything(dtype):
    """Call every launcher on the Honeybee shapes (B=1 and B=64) plus an odd small shape."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for B, Q in [(1, 144), (64, 576)]:
        value, loc, logits = (
            torch.zeros(B, 576, 8, 128, dtype=dtype),
            torch.zeros(B, Q, 8, 1, 4, 2, dtype=dtype),
            torch.zeros(B, Q, 8, 4, dtype=dtype),
        )
        msda._msda_forward(value, [24, 24], loc, logits)
        msda._msda_backward(torch.zeros(B, Q, 1024, dtype=dtype), value, [24, 24], loc, logits)
    value, loc, logits = (
        torch.zeros(2, 125, 3, 24, dtype=dtype),
        torch.zeros(2, 7, 3, 2, 3, 2, dtype=dtype),
        torch.zeros(2, 7, 3, 6, dtype=dtype),
    )
    msda._msda_forward(value, [10, 10, 5, 5], loc, logits)
    msda._msda_backward(torch.zeros(2, 7, 72, dtype=dtype), value, [10, 10, 5, 5], loc, logits)
    for B, h, C, out in [(1, 24, 1024, 12), (64, 16, 1024, 12), (2, 5, 20, 3)]:
        x, p, dw = (
            torch.zeros(B, h * h, C, dtype=dtype),
            torch.zeros(C, dtype=dtype),
            torch.zeros(C, 1, 3, 3, dtype=dtype),
        )
        pooled = torch.zeros(B, out * out, C, dtype=dtype)
        dwconv._cabs_dwconv_block_forward(x, h, h, p, p, dw, p, p, 1e-5)
        dwconv._cabs_dwconv_block_backward(x, torch.zeros(B, C, dtype=acc), x, h, h, p, p, dw, p, p, 1e-5)
        ln_residual._cabs_ln_residual_silu_pool_forward(x, p, p, x, 1e-5, h, h, out, out)
        ln_residual._cabs_ln_residual_silu_pool_backward(pooled, x, p, p, x, 1e-5, h, h, out, out)
        adaptive_pool._cabs_adaptive_avg_pool_forward(x, h, h, out, out)
        adaptive_pool._cabs_adaptive_avg_pool_backward(pooled, x, h, h, out, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--sms", type=int, default=132, help="SM count the tile heuristics assume")
    args = parser.parse_args()
    if common.KERNELS_INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be decorated for the GPU compiler")
    # launch nothing: compile instead, and let the launchers accept CPU tensors
    JITFunction.__getitem__ = lambda fn, grid: CompileOnlyLauncher(fn, args.arch)
    common.kernels_unavailable_reason = lambda device: None
    common.sm_count = msda.sm_count = dwconv.sm_count = lambda device: args.sms
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    for name in args.dtypes.split(","):
        launch_everything(DTYPES[name])
    print(f"compiled {len(CompileOnlyLauncher.seen)} specialisations")


if __name__ == "__main__":
    main()
