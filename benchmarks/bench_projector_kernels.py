"""Benchmark the Honeybee projector kernels: Triton vs eager PyTorch vs torch.compile, one table.

Workloads
  cabs  the whole C-Abstractor (arXiv 2312.06742 §3.2, token-major replica of the official RegStage code):
        RegStage(3) -> adaptive avg pool -> RegStage(3) -> Linear-SiLU-Linear readout, hidden 1024, LLM width
        4096; each bottleneck = conv1 (GEMM) -> cabs_dwconv_block -> SE MLP -> conv3 (GEMM) -> ln_residual_silu
        (the last block of stage 1 uses the fused ln_residual_silu_pool).
  msda  the D-Abstractor's deformable-attention sampling op alone: value (B, h*w, 8, 128), Q = M queries,
        1 level, 4 points, softmax fused in.
Variants
  eager           the PyTorch references (`backend="torch"`), i.e. the model's default path
  compile         torch.compile(eager variant), mode="default"
  compile-max     torch.compile(eager variant), mode="max-autotune-no-cudagraphs" (graphs are applied below)
  triton          the Triton kernels (`backend="triton"`) with the GEMMs and small ops in eager PyTorch (GPU only)
  triton+compile  torch.compile(triton variant): Inductor compiles around the opaque kernels (GPU only)
  At B=1 on a GPU every variant is captured in a CUDA graph and the replay is timed: the projector is
  launch-bound there (~100 launches vs a ~25 us floor), and graphs are how it would be deployed.
Modes
  fwd     inference forward, under torch.no_grad()
  bwd     backward of one retained forward (parameters' and, for msda, inputs' gradients)
  fwd+bwd a training step's forward and backward
Metrics
  ms            median time (p20-p80 in brackets). GPU: triton.testing.do_bench (L2 flushed before each call),
                or the CUDA-graph replay at B=1. CPU: median of --cpu-reps runs after warm-up.
  xeager        eager time / this time;  xcompile: best of compile/compile-max time / this time
  GB/s, TF/s    ideal bytes and FLOPs (below) / time
  peak MB       torch.cuda.max_memory_allocated() during one call, above what was allocated before (GPU only)
  floor us      max(ideal bytes / peak bandwidth, FLOPs / peak FLOP rate)  (kernels.md §2a)
  meas/floor    measured time / floor
Ideal bytes (kernels.md §2a): fwd = weights + input + output; bwd = weights + weight gradients + input (recomputed
from) + output gradient (+ input gradients for msda); fwd+bwd = the sum. FLOPs: torch.utils.flop_counter on the
meta device for cabs (GEMMs; the depthwise conv and elementwise work are <1%), 10 per (query, head, point, channel)
forward and 3x that backward for msda.
Peak rates: H100 3.0 TB/s (measured copy) and 800 TFLOP/s bf16 (measured GEMM); H200 4.3 TB/s, 780 TFLOP/s;
fp32 without TF32 67 TFLOP/s (spec). Override with --peak-gbs / --peak-tflops; on a CPU there is no floor unless
both are given.

    python benchmarks/bench_projector_kernels.py              # GPU: everything (long)
    python benchmarks/bench_projector_kernels.py --quick      # a tiny CPU subset, under a minute
    python benchmarks/bench_projector_kernels.py --workloads cabs --batches 1,8 --dtypes bf16 --modes fwd
"""

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import _common as C
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

dwconv = C.import_package_module("kernels_cabs_dwconv_block")
ln_residual = C.import_package_module("kernels_cabs_ln_residual_silu")
msda = C.import_package_module("kernels_msda")

EPS = 1e-5  # timm LayerNormAct2d, as in the Honeybee RegStages
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- workloads -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    h: int  # input grid side (16 @224 px, 24 @336 px)
    out: int  # pooled side: M = out * out queries


CONFIGS = [
    Config("M144 16x16->12x12", 16, 12),
    Config("M144 24x24->12x12", 24, 12),
    Config("M256 16x16->16x16", 16, 16),
    Config("M576 24x24->24x24", 24, 24),
]


class Bottleneck(nn.Module):
    """timm RegNet Bottleneck as Honeybee builds it (depthwise 3x3, SE 1/4, identity shortcut), token-major."""

    def __init__(self, C, backend):
        super().__init__()
        self.backend = backend
        self.conv1 = nn.Linear(C, C, bias=False)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(C, eps=EPS), nn.LayerNorm(C, eps=EPS), nn.LayerNorm(C, eps=EPS)
        self.dw = nn.Parameter(torch.randn(C, 1, 3, 3) / 3)
        self.fc1, self.fc2 = nn.Linear(C, C // 4), nn.Linear(C // 4, C)
        self.conv3 = nn.Linear(C, C, bias=False)

    def forward(self, x, h, w, pool_to=None):  # x (B, h*w, C)
        y, se = dwconv.cabs_dwconv_block(
            self.conv1(x),
            h,
            w,
            self.ln1.weight,
            self.ln1.bias,
            self.dw,
            self.ln2.weight,
            self.ln2.bias,
            EPS,
            backend=self.backend,
        )
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(se.to(y.dtype)))))  # (B, C)
        y = self.conv3(y * scale[:, None, :])
        if pool_to is None:
            return ln_residual.ln_residual_silu(y, self.ln3.weight, self.ln3.bias, x, EPS, backend=self.backend)
        return ln_residual.ln_residual_silu_pool(
            y, self.ln3.weight, self.ln3.bias, x, EPS, h, w, pool_to, pool_to, backend=self.backend
        )


class CAbstractor(nn.Module):
    """RegStage(depth) -> adaptive pool -> RegStage(depth) -> Linear-SiLU-Linear; (B, h*h, C) -> (B, out*out, W)."""

    def __init__(self, config, backend, C=1024, W=4096, depth=3):
        super().__init__()
        self.h, self.out = config.h, config.out
        self.stage1 = nn.ModuleList(Bottleneck(C, backend) for _ in range(depth))
        self.stage2 = nn.ModuleList(Bottleneck(C, backend) for _ in range(depth))
        self.readout = nn.Sequential(nn.Linear(C, W), nn.SiLU(), nn.Linear(W, W))

    def forward(self, x):
        for i, block in enumerate(self.stage1):
            x = block(x, self.h, self.h, pool_to=self.out if i == len(self.stage1) - 1 else None)
        for block in self.stage2:
            x = block(x, self.out, self.out)
        return self.readout(x)


class MSDA(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        self.shapes, self.backend = [(config.h, config.h)], backend

    def forward(self, value, loc, logits):
        return msda.msda(value, self.shapes, loc, logits, backend=self.backend)


@dataclass
class Workload:
    """A built benchmark case: how to make the module for a backend, its inputs, and its ideal cost."""

    make_module: callable  # backend -> nn.Module on the device, same weights for every backend
    inputs: list  # forward arguments
    grad_inputs: list  # inputs whose gradients the backward computes
    bytes: dict  # mode -> ideal bytes
    flops: dict  # mode -> FLOPs


def build_cabs(config, B, dtype, device, C, W, depth):
    torch.manual_seed(0)
    template = CAbstractor(config, "torch", C, W, depth).to(device, dtype)
    state = template.state_dict()

    def make_module(backend):
        module = CAbstractor(config, backend, C, W, depth).to(device, dtype)
        module.load_state_dict(state)
        return module

    x = torch.randn(B, config.h * config.h, C, device=device, dtype=dtype)  # CLIP features, frozen: no grad
    element = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in template.parameters()) * element
    x_bytes, out_bytes = x.numel() * element, B * config.out**2 * W * element
    fwd_bytes = weights + x_bytes + out_bytes
    bwd_bytes = 2 * weights + x_bytes + out_bytes
    flops = cabs_flops(config, C, W, depth, dtype)
    return Workload(
        make_module,
        [x],
        [],
        {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
        {k: v * B for k, v in flops.items()},
    )


def cabs_flops(config, C, W, depth, dtype):
    """FLOPs of one image's forward and backward, counted on the meta device (no compute)."""
    with torch.device("meta"):
        module = CAbstractor(config, "torch", C, W, depth).to(dtype)
        x = torch.empty(1, config.h * config.h, C, dtype=dtype)
        with FlopCounterMode(display=False) as fwd_counter:
            out = module(x)
        with FlopCounterMode(display=False) as bwd_counter:
            out.backward(torch.empty_like(out))
    fwd, bwd = fwd_counter.get_total_flops(), bwd_counter.get_total_flops()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def build_msda(config, B, dtype, device, nh=8, hd=128, P=4):
    torch.manual_seed(0)
    Q, S = config.out**2, config.h * config.h
    value = torch.randn(B, S, nh, hd, device=device, dtype=dtype, requires_grad=True)
    loc = torch.rand(B, Q, nh, 1, P, 2, device=device, dtype=dtype).requires_grad_()
    logits = torch.randn(B, Q, nh, P, device=device, dtype=dtype, requires_grad=True)
    element = torch.finfo(dtype).bits // 8
    io = (value.numel() + loc.numel() + logits.numel()) * element
    out = B * Q * nh * hd * element
    fwd_flops = 10 * B * Q * nh * P * hd
    return Workload(
        lambda backend: MSDA(config, backend),
        [value, loc, logits],
        [value, loc, logits],
        {"fwd": io + out, "bwd": 2 * io + out, "fwd+bwd": 3 * io + 2 * out},
        {"fwd": fwd_flops, "bwd": 3 * fwd_flops, "fwd+bwd": 4 * fwd_flops},
    )


# ---- timing -------------------------------------------------------------------------------------------------------


def step_fn(module, workload, mode):
    """The callable to time for one mode; every parameter gradient is pre-allocated by a warm-up call."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                module(*workload.inputs)

        return fwd
    out = module(*workload.inputs)
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: module(*workload.inputs).backward(grad)


def cuda_graph(fn):
    """Capture fn in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs asks) and return replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_memory(fn, device):
    """Bytes allocated at the peak of one call, above what was allocated before it (None on a CPU)."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_fn(fn, device, cpu_reps):
    """(median ms, p20 ms, p80 ms)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=100, rep=500, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def make_variant(workload, variant):
    backend = "triton" if variant.startswith("triton") else "torch"
    module = workload.make_module(backend)
    if variant in ("compile", "triton+compile"):
        module = torch.compile(module)
    elif variant == "compile-max":
        module = torch.compile(module, mode="max-autotune-no-cudagraphs")
    return module


def check_against_eager(workload, module, eager, dtype):
    """Correctness gate before timing: relative L2 error of the forward vs the eager reference."""
    with torch.no_grad():
        out, ref = module(*workload.inputs).float(), eager(*workload.inputs).float()
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    limit = 2e-2 if dtype == torch.bfloat16 else 1e-3
    return rel, rel <= limit


# ---- the table ---------------------------------------------------------------------------------------------------


def peak_rates(device, dtype, args):
    """(bytes/s, FLOP/s) or (None, None) when unknown."""
    if args.peak_gbs and args.peak_tflops:
        return args.peak_gbs * 1e9, args.peak_tflops * 1e12
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    bandwidth = 4.3e12 if "H200" in name else 3.0e12 if "H100" in name else None
    flops = (780e12 if "H200" in name else 800e12 if "H100" in name else None) if dtype == torch.bfloat16 else 67e12
    return (bandwidth, flops) if bandwidth else (None, None)


def fmt(value, spec):
    """format(value, spec), or '-' for a missing value."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


COLUMNS = [  # (title, width)
    ("workload", 8), ("config", 19), ("B", 3), ("dtype", 5), ("mode", 7), ("variant", 14), ("ms", 9),
    ("(p20-p80)", 17), ("xeager", 7), ("xcompile", 8), ("GB/s", 7), ("TF/s", 7), ("peak MB", 8),
    ("floor us", 9), ("meas/floor", 10),
]  # fmt: skip


def table_row(values):
    """One line of the table: the first six columns left-aligned, the numbers right-aligned."""
    return " ".join(v.ljust(w) if i < 6 else v.rjust(w) for i, (v, (_, w)) in enumerate(zip(values, COLUMNS)))


def run_case(kind, config, dtype_name, B, variants, device, args):
    """Build one workload, check the Triton variants against eager, then time every variant in every mode."""
    dtype = DTYPES[dtype_name]
    bandwidth, flop_rate = peak_rates(device, dtype, args)
    if kind == "cabs":
        workload = build_cabs(config, B, dtype, device, args.hidden, args.llm_width, args.depth)
    else:
        workload = build_msda(config, B, dtype, device)
    eager = workload.make_module("torch")
    modules = {v: make_variant(workload, v) for v in variants}
    notes = dict.fromkeys(modules, "")
    for variant in [v for v in modules if v.startswith("triton")]:
        rel, ok = check_against_eager(workload, modules[variant], eager, dtype)
        notes[variant] = "" if ok else f"  !! rel-L2 vs eager {rel:.1e}"
    for mode in args.modes:
        times = {}
        for variant, module in modules.items():
            fn = step_fn(module, workload, mode)
            peak = peak_memory(fn, device)  # before graph capture: a replay allocates nothing
            if device.type == "cuda" and B == 1:
                fn = cuda_graph(fn)
            median, p20, p80 = time_fn(fn, device, args.cpu_reps)
            times[variant] = median
            seconds = median * 1e-3
            floor = max(workload.bytes[mode] / bandwidth, workload.flops[mode] / flop_rate) if bandwidth else None
            best_compile = min((times[v] for v in ("compile", "compile-max") if v in times), default=None)
            values = [
                kind, config.name, str(B), dtype_name, mode, variant, f"{median:.3f}", f"({p20:.3f}-{p80:.3f})",
                fmt(times["eager"] / median if "eager" in times else None, ".2f"),
                fmt(best_compile / median if best_compile else None, ".2f"),
                f"{workload.bytes[mode] / seconds / 1e9:.3g}", f"{workload.flops[mode] / seconds / 1e12:.3g}",
                fmt(peak / 2**20 if peak is not None else None, ".1f"),
                fmt(floor * 1e6 if floor else None, ".1f"), fmt(seconds / floor if floor else None, ".2f"),
            ]  # fmt: skip
            print(table_row(values) + notes[variant], flush=True)


def run(args):
    device = torch.device(args.device)
    variants = ["eager", "compile", "compile-max"] + (["triton", "triton+compile"] if device.type == "cuda" else [])
    variants = [v for v in variants if v in args.variants]
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}"
    )
    if device.type != "cuda":
        print("no GPU: Triton rows are skipped (the kernels only run on CPU under the slow interpreter)")
    print(table_row([title for title, _ in COLUMNS]))
    for kind in args.workloads:
        for config in [c for c in CONFIGS if c.name in args.configs]:
            for dtype_name in args.dtypes:
                for B in args.batches:
                    run_case(kind, config, dtype_name, B, variants, device, args)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="cabs,msda")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS), help="comma-separated config names")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    parser.add_argument("--variants", default="eager,compile,compile-max,triton,triton+compile")
    parser.add_argument("--hidden", type=int, default=1024, help="C-Abstractor hidden width")
    parser.add_argument("--llm-width", type=int, default=4096, help="readout width (4096 for 7B, 5120 for 13B)")
    parser.add_argument("--depth", type=int, default=3, help="bottlenecks per RegStage")
    parser.add_argument("--cpu-reps", type=int, default=5)
    parser.add_argument("--peak-gbs", type=float, help="peak memory bandwidth for the floor, GB/s")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP rate for the floor, TFLOP/s")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny CPU subset (under a minute): eager and compile, B=1, fp32, fwd+bwd, "
        "a narrow one-block-per-stage C-Abstractor",
    )
    args = parser.parse_args()
    if args.quick:
        args.device, args.batches, args.dtypes, args.modes = "cpu", "1", "fp32", "fwd+bwd"
        args.configs, args.variants, args.cpu_reps = "M144 16x16->12x12", "eager,compile", 5
        args.hidden, args.llm_width, args.depth = 128, 256, 1
    args.workloads = args.workloads.split(",")
    args.configs = args.configs.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.modes = args.modes.split(",")
    args.variants = args.variants.split(",")
    return args


if __name__ == "__main__":
    run(parse_args())
