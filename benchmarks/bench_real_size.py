"""Honeybee at its real size on a CPU: the 7B releases against LLaVA-1.5-7B, decode against the machine's memory
bandwidth, and the quantized decode paths a CPU user would pick. Random weights, bf16, batch 1.

`ttft`: Honeybee-C-7B-M144 and D-7B-M144 (CLIP ViT-L/14 at 224 px, 144 visual tokens) against transformers' own
`LlavaForConditionalGeneration` at LLaVA-1.5-7B's shapes (CLIP-L/14 at 336 px, 576 visual tokens), one shared
Vicuna-7B-shaped Llama (bench_e2e.py builds them), text prompts of 32 and 512 tokens: time to first token next to
the counted prefill-FLOP ratio, decode s/token, and decode against the roofline: the bytes a decode step must read
(the LLM's weights except the embedding, of which it reads one row, plus the KV cache) over the memory bandwidth
measured in the same run (a large tensor copy).

`kernels`: one decode token through every linear layer shape of the 7B LLM (q/k/v/o 4096x4096, gate/up 11008x4096,
down 4096x11008, x 32 layers; lm_head stays bf16, as transformers' quantizers leave it) with each CPU path: bf16,
bf16 with a `torch.compile`d matrix-vector product (`CompiledGemvLinear`), torchao int8 weight-only (eager and
`torch.compile`d), torchao int4 weight-only (its CPU tinygemm layout), torchao int8-activation int4-weight (its CPU
kernel), bitsandbytes 8-bit and NF4 on its CPU backend, and `aten._weight_int8pack_mm` (the CPU int8 kernel inductor
lowers weight-only int8 to; no library calls it in eager mode). The sum over the layers is the LLM's decode time per
token without attention and glue.

`quant`: C-7B-M144 end to end with the paths of `kernels` (`--methods`): TTFT, decode s/token and the drift of the
first token's logits against bf16, on the same weights and inputs.

    python benchmarks/bench_real_size.py ttft            # ~20 min on 2 cores, ~17 GiB
    python benchmarks/bench_real_size.py kernels         # ~3 min, ~2 GiB
    python benchmarks/bench_real_size.py quant --methods bf16 torchao-int8 torchao-int4
"""

import argparse
import gc
import math
import os
import time

import _common as C
import torch
from bench_e2e import MODELS, REFERENCE, SIZES, build_models, generate_once, make_inputs, prefill_flops

HONEYBEE_7B = ("Honeybee-C-M144 @224", "Honeybee-D-M144 @224")
NEW_TOKENS = 8
CPU = torch.device("cpu")
STREAMED_BYTES = 768 * 2**20  # bf16 weights called in turn per shape in `kernels`: several times the caches


def copy_bandwidth(gib=2, repeats=5):
    """Bytes moved per second (read + write) by a copy of a `gib` GiB tensor: the memory bandwidth a decode step
    can hope for (a step streams its weights once; a copy reads and writes, so this counts both)."""
    src = torch.ones(gib * 2**30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / C.median(times)


def decode_bytes(llama, tokens):
    """Bytes one decode step reads: every LLM weight but the embedding (one row of it is read), and the KV cache of
    `tokens` positions."""
    config = llama.config
    weights = C.tensor_bytes(llama) - C.tensor_bytes(llama.get_input_embeddings())
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 2  # K and V, bf16
    return weights + kv


def step_bytes(llama, tokens, method):
    """decode_bytes with the decoder's linear weights at the bits per weight of quantized path `method`."""
    linear = sum(C.tensor_bytes(m) for m in llama.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return decode_bytes(llama, tokens) - linear * (1 - BITS.get(method, 8) / 16)


def run_ttft(args):
    dtype = torch.bfloat16
    names = (REFERENCE, *HONEYBEE_7B)
    flops = prefill_flops(args.size, dtype, [1], args.prompt)
    torch.manual_seed(0)
    models, llama = build_models(args.size, CPU, dtype, names)
    gc.collect()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    clocks = ("wall", "cpu")
    rows = []
    for prompt in args.prompt:
        inputs = {
            name: make_inputs("honeybee", MODELS[name][3], MODELS[name][1], 1, prompt, CPU, dtype, seed=prompt)
            for name in names
        }
        for name in names:  # warm-up: the first call of a shape sets up oneDNN and the allocator
            generate_once(models[name], inputs[name], 2, CPU)
        runs = {name: {c: ([], []) for c in clocks} for name in names}
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                for c, (ttft, steps) in generate_once(models[name], inputs[name], NEW_TOKENS, CPU, clocks).items():
                    runs[name][c][0].append(ttft)
                    runs[name][c][1].extend(steps)
            print(f"L={prompt}: repeat {repeat + 1} done", flush=True)
        ref = runs[REFERENCE]
        for name in names:
            ttft, steps = runs[name]["wall"]
            tokens = MODELS[name][3] + prompt
            step = C.median(steps)
            roofline = decode_bytes(llama, tokens + NEW_TOKENS / 2) / bandwidth
            rows.append(
                [
                    name,
                    prompt,
                    tokens,
                    f"{flops[(1, prompt, name)][1] / flops[(1, prompt, REFERENCE)][1]:.2f}",
                    C.median_and_runs(ttft, 2),
                    " / ".join(f"{C.median(runs[name][c][0]) / C.median(ref[c][0]):.2f}" for c in clocks),
                    f"{step:.3f} ({', '.join(f'{s:.3f}' for s in C.spread(steps))})",
                    f"{decode_bytes(llama, tokens + NEW_TOKENS / 2) / 1e9:.2f}",
                    f"{roofline:.3f}",
                    f"{step / roofline:.2f}",
                ]
            )
    extra = [
        f"models: {', '.join(names)}; CLIP ViT-L/14, Llama {SIZES['7b']['text']} (Vicuna-7B), vocab 32001, one "
        "shared Llama, random weights (seed 0), bf16 (the D-Abstractor fp32, as from_pretrained loads it), sdpa",
        f"batch 1, random pixels and random text ids of the stated length; greedy generate of {NEW_TOKENS} tokens; "
        f"1 warm-up (2 tokens) + {args.repeats} timed calls per model, interleaved (A B C, C B A, ...)",
        "TTFT: the generate call until the first token exists; decode s/token: median of all steps of all runs "
        "(p20–p80 in brackets); ratios to LLaVA-1.5 on two clocks `wall / cpu` (the process's CPU time)",
        f"memory bandwidth: a copy of a 2 GiB tensor, median of 5, bytes read + written / time: "
        f"**{bandwidth / 1e9:.1f} GB/s**, measured in this run; roofline = bytes one decode step reads (LLM "
        "weights without the embedding + bf16 KV cache at the mean length of the timed steps) / that bandwidth",
        f"peak RSS of the process: {C.peak_rss_gib():.2f} GiB (three models sharing one Llama)",
    ]
    lines = C.header("Real size (7B) on CPU: Honeybee vs LLaVA-1.5", CPU, dtype, C.command_line(), extra)
    lines += C.table(
        [
            "model",
            "L (text)",
            "prompt tokens",
            "prefill FLOPs / LLaVA",
            "TTFT s, median (runs)",
            "TTFT / LLaVA (wall / cpu)",
            "decode s/token (p20–p80)",
            "GB read per step",
            "roofline s/token",
            "measured / roofline",
        ],
        rows,
    )
    return lines


# ---- quantized paths -------------------------------------------------------------------------------------------


def _torchao(config_name):
    def quantize(module):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        if config_name == "int8":
            config = Int8WeightOnlyConfig()
        elif config_name == "int4":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            config = PrototypeInt4WeightOnlyConfig(group_size=128)
        else:
            from torchao.prototype.quantization.int4.inference_workflow import Int8DynamicActivationInt4WeightConfig

            config = Int8DynamicActivationInt4WeightConfig(group_size=128)
        quantize_(module, config)
        return module

    return quantize


def _bitsandbytes(kind):
    def quantize(module):
        import bitsandbytes as bnb

        weight = module.weight.data
        if kind == "8bit":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        return layer.to("cpu")

    return quantize


class Int8PackLinear(torch.nn.Module):
    """Per-row symmetric int8 weights through `aten._weight_int8pack_mm`, the CPU kernel behind inductor's
    weight-only int8 lowering: what an int8 decode can reach here when nothing but the kernel runs."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.data.float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.qweight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(torch.bfloat16)

    def forward(self, x):
        shape = x.shape
        return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scale).reshape(
            *shape[:-1], -1
        )


# Inductor sums a float reduction longer than this through its cascade-summation helper, whose accumulator lives in
# memory (a std::vector) instead of a register: the down projection's 11008-long rows streamed at ~24 GB/s against
# ~32 GB/s for the 4096-long rows of the others.
INDUCTOR_CASCADE_CHUNK = 4096


@torch.compile(dynamic=False)
def _gemv(x, weight):
    """`x (1, in) @ weight.T` as a product and a sum: inductor writes this as one vectorised loop with fp32
    accumulation that streams the bf16 weights at close to the copy bandwidth, where `aten::mm` for one row (oneDNN's
    bf16 path) streams them at about half of it (see `kernels`). A row longer than `INDUCTOR_CASCADE_CHUNK` is summed
    in equal pieces no longer than it, then the pieces are added."""
    out_features, in_features = weight.shape
    fewest = math.ceil(in_features / INDUCTOR_CASCADE_CHUNK)
    pieces = next(n for n in range(fewest, in_features + 1) if in_features % n == 0)
    products = x.float().view(1, pieces, -1) * weight.float().view(out_features, pieces, -1)
    return products.sum(-1).sum(-1).unsqueeze(0).to(x.dtype)


class CompiledGemvLinear(torch.nn.Module):
    """bf16 weights, unchanged; a single row (a decode step at batch 1) goes through `_gemv`, anything longer (the
    prefill) through `F.linear`, where one pass of a GEMM serves every row."""

    def __init__(self, linear):
        super().__init__()
        assert linear.bias is None, "the Llama's linear layers have no bias"
        self.weight = linear.weight

    def forward(self, x):
        if x.numel() != x.shape[-1]:
            return torch.nn.functional.linear(x, self.weight)
        return _gemv(x.reshape(1, -1), self.weight).reshape(*x.shape[:-1], -1)


QUANTIZERS = {
    "bf16": lambda module: module,
    "bf16-gemv-compiled": CompiledGemvLinear,
    "torchao-int8": _torchao("int8"),
    "torchao-int8-compiled": _torchao("int8"),
    "torchao-int4": _torchao("int4"),
    "torchao-da8w4": _torchao("da8w4"),
    "bnb-8bit": _bitsandbytes("8bit"),
    "bnb-nf4": _bitsandbytes("nf4"),
    "aten-int8pack": Int8PackLinear,
}
COMPILED = {"torchao-int8-compiled"}  # the quantized layers run under torch.compile (inductor)
BITS = {"bf16": 16, "bf16-gemv-compiled": 16, "bnb-nf4": 4, "torchao-int4": 4, "torchao-da8w4": 4}


class Copies(torch.nn.Module):
    """Calls each of several layers of one shape on the same input: together they are larger than the caches, so
    every call reads its weights from memory, as a decode step does."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def run_kernels(args):
    text = SIZES["7b"]["text"]
    hidden, inner, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    shapes = {"q/k/v/o": ((hidden, hidden), 4), "gate/up": ((inner, hidden), 2), "down": ((hidden, inner), 1)}
    lm_head = (32001, hidden)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        name: torch.randn(1, shape[1], generator=generator).to(torch.bfloat16) for name, (shape, _) in shapes.items()
    }
    head = torch.nn.Linear(*lm_head[::-1], bias=False, dtype=torch.bfloat16)
    head_x = torch.randn(1, hidden, dtype=torch.bfloat16)
    head_s = C.median(timings(lambda: head(head_x), 10))
    bandwidth = copy_bandwidth()
    rows = []
    for method in args.methods:
        per_shape, errors, failed = {}, [], None
        for name, (shape, _) in shapes.items():
            copies = max(2, math.ceil(STREAMED_BYTES / (shape[0] * shape[1] * 2)))
            generator.manual_seed(1)  # the same weights for every path
            linears = [torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16) for _ in range(copies)]
            for linear in linears:
                linear.weight.data = torch.randn(*shape, generator=generator).mul_(0.02).to(torch.bfloat16)
            exact = inputs[name].double() @ linears[0].weight.double().t()
            try:
                stack = Copies([QUANTIZERS[method](linear) for linear in linears])
                if method in COMPILED:
                    stack = torch.compile(stack)
                with torch.no_grad():
                    out = stack(inputs[name])[0]
                repeats = 2 if "bnb" in method else 7
                per_shape[name] = C.median(timings(lambda f=stack, x=inputs[name]: f(x), repeats)) / copies
            except Exception as error:  # a path without a kernel here: reported as such, the others go on
                failed = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                break
            errors.append(((out.double() - exact).norm() / exact.norm()).item())
            del stack, linears
            gc.collect()
        if failed:
            rows.append([method, *["–"] * (len(shapes) + 4), failed])
            continue
        layer_s = sum(per_shape[name] * count for name, (_, count) in shapes.items())
        token_s = layers * layer_s + head_s
        weight_bytes = layers * sum(shape[0] * shape[1] * count for shape, count in shapes.values())
        weight_bytes = weight_bytes * BITS.get(method, 8) / 8
        rows.append(
            [
                method,
                *[f"{per_shape[name] * 1e3:.2f}" for name in shapes],
                f"{token_s:.3f}",
                f"{weight_bytes / (layers * layer_s) / 1e9:.1f}",
                f"{max(errors):.1e}",
                f"{(weight_bytes + lm_head[0] * lm_head[1] * 2) / bandwidth:.3f}",
                "",
            ]
        )
        print(rows[-1], flush=True)
    extra = [
        f"one token (batch 1) through each linear shape of the 7B LLM; per layer: 4 x q/k/v/o, 2 x gate/up, 1 x down; "
        f"x {layers} layers + lm_head in bf16 ({head_s * 1e3:.1f} ms) = LLM linear time per token",
        f"ms per layer: one call of ~{STREAMED_BYTES >> 20} MiB of bf16 layers of that shape in turn (so that the "
        "weights come from memory, not the caches) / their number, median of 7 calls (2 for bitsandbytes) after "
        "one untimed call; GB/s = bytes of the quantized weights "
        "(bits x elements, scales not counted) / time; error: relative L2 error against the fp64 product of the same "
        "bf16 weights and input (the worst shape)",
        f"memory bandwidth (copy of 2 GiB, read + write): {bandwidth / 1e9:.1f} GB/s; roofline = weight bytes per "
        "token (with the bf16 lm_head) / that bandwidth",
        "torchao 0.18: Int8WeightOnlyConfig; PrototypeInt4WeightOnlyConfig (group 128, `_weight_int4pack_mm_for_cpu`); "
        "Int8DynamicActivationInt4WeightConfig (group 128, `da8w4_linear_cpu`); bitsandbytes "
        f"{_version('bitsandbytes')}: Linear8bitLt, Linear4bit nf4",
    ]
    lines = C.header(
        "7B decode: the LLM's linear layers per quantized CPU path",
        CPU,
        torch.bfloat16,
        C.command_line(),
        extra,
    )
    lines += C.table(
        [
            "path",
            *[f"{name} ms" for name in shapes],
            "s/token (linear layers)",
            "weight GB/s",
            "error",
            "roofline s/token",
            "note",
        ],
        rows,
    )
    return lines


def _version(package):
    from importlib.metadata import version

    return version(package)


def timings(fn, repeats):
    out = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return out


def quantize_llm(model, method):
    """Every linear layer of the LLM's decoder through QUANTIZERS[method]; lm_head, CLIP and the projector stay.
    A COMPILED path compiles each quantized linear layer on its own, as `kernels` does: the 224 layers share one
    `forward`, so dynamo compiles one graph per weight shape (three) and input length; a compiled decoder layer would
    be specialised on its `layer_idx`, one graph per layer, past dynamo's recompile limit."""
    quantize = QUANTIZERS[method]
    if method in COMPILED:
        quantize = lambda module, plain=quantize: torch.compile(plain(module))  # noqa: E731
    for layer in model.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, quantize(child))
    gc.collect()
    return model


def run_quant(args):
    dtype, name = torch.bfloat16, HONEYBEE_7B[0]
    inputs = make_inputs("honeybee", MODELS[name][3], MODELS[name][1], 1, args.prompt[0], CPU, dtype, seed=0)
    bandwidth = copy_bandwidth()
    rows, reference = [], None
    for method in args.methods:
        torch.manual_seed(0)  # the same weights for every path
        models, llama = build_models(args.size, CPU, dtype, (name,))
        roofline = step_bytes(llama, inputs["input_ids"].shape[1] + NEW_TOKENS / 2, method) / bandwidth
        model = quantize_llm(models[name], method)
        del models, llama  # the model holds the Llama; no other reference may keep it past this path
        with torch.no_grad():
            start = time.perf_counter()
            logits = model(**inputs).logits[0, -1].float()
            first_forward = time.perf_counter() - start
        if reference is None:
            reference = logits
        generate_once(model, inputs, 2, CPU)
        ttfts, steps = [], []
        for _ in range(args.repeats):
            (ttft, run_steps) = generate_once(model, inputs, NEW_TOKENS, CPU)["wall"]
            ttfts.append(ttft)
            steps.extend(run_steps)
        drift = ((logits - reference).norm() / reference.norm()).item()
        same_top = bool(logits.argmax() == reference.argmax())
        rows.append(
            [
                method,
                f"{first_forward:.1f}",
                C.median_and_runs(ttfts, 2),
                f"{C.median(steps):.3f} ({', '.join(f'{s:.3f}' for s in C.spread(steps))})",
                f"{roofline:.3f}",
                f"{C.median(steps) / roofline:.2f}",
                f"{drift:.1e}",
                "yes" if same_top else "no",
                f"{C.peak_rss_gib():.1f}",
            ]
        )
        print(rows[-1], flush=True)
        del model
        gc.collect()
    extra = [
        f"{name}: CLIP ViT-L/14, C-Abstractor, Vicuna-7B-shaped Llama, random weights (seed 0, the same for every "
        f"path), bf16; the LLM's decoder linear layers quantized in memory (lm_head, CLIP and projector bf16)",
        f"batch 1, random pixels, {args.prompt[0]} random text ids; first forward = the first call after quantizing "
        f"(compilation included); TTFT and decode from {args.repeats} greedy generates of {NEW_TOKENS} tokens after "
        "a 2-token warm-up; drift: relative L2 distance of the prompt's last-position logits from bf16's",
        f"memory bandwidth (copy of 2 GiB, read + write): {bandwidth / 1e9:.1f} GB/s; roofline = bytes one decode "
        "step reads (as in `ttft`, with the decoder's linear weights at the path's bits per weight, scales not "
        "counted) / that bandwidth; peak RSS is the process's high-water mark so far (it includes the paths before)",
    ]
    lines = C.header("7B decode end to end, quantized CPU paths", CPU, dtype, C.command_line(), extra)
    lines += C.table(
        [
            "path",
            "first forward s",
            "TTFT s (runs)",
            "decode s/token (p20–p80)",
            "roofline s/token",
            "measured / roofline",
            "logit drift vs bf16",
            "same top token",
            "peak RSS GiB",
        ],
        rows,
    )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["ttft", "kernels", "quant"])
    parser.add_argument("--prompt", type=int, nargs="+", default=[32, 512], help="text tokens after the image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="7b", choices=sorted(SIZES), help="`small`: a quick check of the script")
    parser.add_argument("--methods", nargs="+", choices=sorted(QUANTIZERS), default=list(QUANTIZERS))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--out", default=None, help="markdown report (default results/real_size_<part>_cpu.md)")
    args = parser.parse_args()
    C.setup_threads(args.threads)
    lines = {"ttft": run_ttft, "kernels": run_kernels, "quant": run_quant}[args.part](args)
    print("\n".join(lines))
    out = args.out or (C.RESULTS / f"real_size_{args.part}_cpu.md")
    C.write_report(lines, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
