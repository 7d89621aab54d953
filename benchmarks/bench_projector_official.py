"""Our C-/D-Abstractor against the libraries the official Honeybee code is built from, with the same weights.

- official C-Abstractor = timm 0.9.8 `RegStage` x2 (stride 1, SiLU, LayerNorm2d) around `nn.AdaptiveAvgPool2d`,
  then Linear-SiLU-Linear, on NCHW maps (honeybee/projectors/projectors.py `CAbstractor`). Its keys
  (`net.0.b1.conv1.conv.weight`, ...) are the checkpoints' and ours.
- official D-Abstractor = transformers' `DeformableDetrDecoder` (6 `DeformableDetrDecoderLayer`s; the official
  `DAbstractor` subclasses it and runs the same loop) with the official wrapper around it: input projection,
  `v_pos_emb`, adaptive-pooled query positions, learned reference points, output Linear (dabs.py). transformers
  5.x reproduces the official 4.38 layer after renaming three keys (honeybee_official.md §3.4); the official code
  ran the decoder self-attention in eager mode, which is the "official" row; "sdpa" is the same layers with
  transformers' SDPA attention.

One random official-format state dict per projector is loaded into both sides (into ours through the package's
own converter, `honeybee_hf.convert.official.map_official_abstractor`), the outputs are compared (max |diff| in
the table), then forward (no grad) and forward+backward (grads for every weight, eval mode so dropout is off)
are timed, interleaved, and their peak memory measured (see _common.py for how).

    python benchmarks/bench_projector_official.py --quick          # < 2 min on 2 CPU cores
    python benchmarks/bench_projector_official.py                  # batch 1 and 8
    python benchmarks/bench_projector_official.py --device cuda --dtype bfloat16   # C-Abs in bf16; D-Abs stays fp32
"""

import argparse
import gc
import json
import math
from functools import partial
from pathlib import Path

import _common as C
import torch
from torch import nn

# The released Honeybee-7B M144 projectors (honeybee_official.md §2.4, §3.1): CLIP ViT-L/14 at 224 px.
VISION_WIDTH, GRID, LM_WIDTH, QUERIES = 1024, 16, 4096, 144
CABS = dict(hidden_size=1024, depth=3, mlp_depth=2)
DABS = dict(d_model=1024, decoder_layers=6, decoder_attention_heads=8, decoder_n_points=4, decoder_ffn_dim=1024)


# ---------------------------------------------------------------------------------------------------------
# the official formulations
# ---------------------------------------------------------------------------------------------------------


class OfficialCAbstractor(nn.Module):
    """The official CAbstractor's computation from timm's RegStage (pos_emb=True, prenorm=False, no eos)."""

    def __init__(
        self, num_input_tokens, encoder_hidden_size, hidden_size, output_hidden_size, depth, mlp_depth, num_queries
    ):
        super().__init__()
        from timm.layers import LayerNorm2d
        from timm.models.regnet import RegStage

        block = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        side = math.isqrt(num_queries)
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, encoder_hidden_size))
        self.net = nn.Sequential(
            block(depth, encoder_hidden_size, hidden_size),
            nn.AdaptiveAvgPool2d((side, side)),
            block(depth, hidden_size, hidden_size),
        )
        layers = [nn.Linear(hidden_size, output_hidden_size)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(output_hidden_size, output_hidden_size)]
        self.readout = nn.Sequential(*layers)

    def forward(self, x):  # (B, N, Cv)
        x = x + self.pos_emb  # NOTE: the official code adds in place into the caller's tensor; same cost
        B, N, Cv = x.shape
        hw = math.isqrt(N)
        x = x.transpose(1, 2).reshape(B, Cv, hw, hw)  # "b (h w) d -> b d h w"
        x = self.net(x)
        x = x.flatten(2).transpose(1, 2)  # "b d h w -> b (h w) d"
        return self.readout(x)


class OfficialDAbstractor(nn.Module):
    """The official DAbstractor's computation around transformers' DeformableDetrDecoder (pooled_v_target='query',
    one feature level, no eos, input projection = identity as released)."""

    def __init__(self, num_input_tokens, output_hidden_size, num_queries, attn_implementation, **ddetr):
        super().__init__()
        from transformers import DeformableDetrConfig
        from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrDecoder

        config = DeformableDetrConfig(
            num_feature_levels=1, num_queries=num_queries, activation_function="relu", dropout=0.1, **ddetr
        )
        config._attn_implementation = attn_implementation
        self.decoder = DeformableDetrDecoder(config)
        d, side = config.d_model, math.isqrt(num_queries)
        self.grid = math.isqrt(num_input_tokens)
        self.downsampler = nn.AdaptiveAvgPool2d((side, side))
        self.query_position_embeddings = nn.Embedding(num_queries, d)
        self.reference_points = nn.Parameter(torch.zeros(1, num_queries, 2))
        self.v_pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, d))
        self.output_proj = nn.Linear(d, output_hidden_size)

    def forward(self, x):  # (B, N, d)
        x = x.float() + self.v_pos_emb  # the official forward casts to fp32; input_proj is Identity (Cv == d)
        B, N, d = x.shape
        pos = self.downsampler(x.transpose(1, 2).reshape(B, d, self.grid, self.grid)).flatten(2).transpose(1, 2)
        target = self.query_position_embeddings.weight.unsqueeze(0).expand(B, -1, -1)
        out = self.decoder(
            inputs_embeds=target,
            encoder_hidden_states=x,
            object_queries_position_embeddings=pos,
            reference_points=self.reference_points.expand(B, -1, -1),
            spatial_shapes=torch.tensor([[self.grid, self.grid]], device=x.device),
            spatial_shapes_list=[(self.grid, self.grid)],
            level_start_index=torch.zeros(1, dtype=torch.long, device=x.device),
            valid_ratios=torch.ones(B, 1, 2, device=x.device),
        ).last_hidden_state
        return self.output_proj(out)


# transformers 4.38 (official checkpoints, ours) -> 5.x DeformableDetrDecoderLayer names (honeybee_official.md §3.4)
DDETR_5X_RENAMES = ((".self_attn.out_proj.", ".self_attn.o_proj."), (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."))


def to_ddetr_5x(official_state_dict):
    out = {}
    for key, tensor in official_state_dict.items():
        if key.startswith("layers."):
            for old, new in DDETR_5X_RENAMES:
                key = key.replace(old, new)
            key = "decoder." + key
        out[key] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------
# building the pairs with the same weights
# ---------------------------------------------------------------------------------------------------------


def randomise_(module, seed):
    """Non-trivial weights everywhere (LayerNorm affine, embeddings, pos_emb) so the parity check means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("reference_points"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.1)
            elif p.dim() == 1 and ("bn." in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(fan_in, 1)))
    return module


def build_cabs(backend):
    from honeybee_hf.configuration_honeybee import HoneybeeProjectorConfig
    from honeybee_hf.convert.official import map_official_abstractor
    from honeybee_hf.modeling_honeybee import HoneybeeCAbstractor

    N = GRID * GRID
    official = OfficialCAbstractor(
        N, VISION_WIDTH, CABS["hidden_size"], LM_WIDTH, CABS["depth"], CABS["mlp_depth"], QUERIES
    )
    randomise_(official, seed=1)
    checkpoint = official.state_dict()  # official key names
    ours = {}
    for b in backend:
        config = HoneybeeProjectorConfig(projector_type="c-abs", num_query_tokens=QUERIES, pos_emb=True, **CABS)
        config.kernel_backend = b  # runtime state (what model.set_kernel_backend sets)
        model = HoneybeeCAbstractor(config, N, VISION_WIDTH, LM_WIDTH)
        model.load_state_dict(map_official_abstractor(checkpoint, model.state_dict()), strict=True)
        ours[b] = model
    return official, ours


def build_dabs(backend, attn_implementations):
    from honeybee_hf.configuration_honeybee import HoneybeeProjectorConfig
    from honeybee_hf.convert.official import map_official_abstractor
    from honeybee_hf.modeling_honeybee import HoneybeeDAbstractor

    N = GRID * GRID
    ours = {}
    checkpoint = None
    for b in backend:
        config = HoneybeeProjectorConfig(projector_type="d-abs", num_query_tokens=QUERIES, pos_emb=True, **DABS)
        config.kernel_backend = b  # runtime state (what model.set_kernel_backend sets)
        model = HoneybeeDAbstractor(config, N, VISION_WIDTH, LM_WIDTH)
        if checkpoint is None:
            checkpoint = randomise_(model, seed=2).state_dict()  # 4.38 = official = our key names
        model.load_state_dict(map_official_abstractor(checkpoint, model.state_dict()), strict=True)
        ours[b] = model
    officials = {}
    for impl in attn_implementations:
        official = OfficialDAbstractor(N, LM_WIDTH, QUERIES, impl, **DABS)
        official.load_state_dict(to_ddetr_5x(checkpoint), strict=True)
        officials[impl] = official
    return officials, ours


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------


def make_step(model, x, mode, grad_out):
    params = [p for p in model.parameters()]
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return model(x)

    else:

        def step():
            for p in params:
                p.grad = None
            out = model(x)
            out.backward(grad_out)
            return out

    return step


def measure(variants, x, mode, repeats, warmup, device, clocks):
    """variants: {name: model}, run interleaved (forward order on even runs, reversed on odd ones).

    Returns {name: dict(runs={clock: [seconds]}, peak=bytes)}."""
    with torch.no_grad():
        shape = variants[next(iter(variants))](x).shape
    grad_out = (
        torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=x.dtype)
        if mode != "fwd"
        else None
    )
    steps = {name: make_step(m, x, mode, grad_out) for name, m in variants.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    runs = {name: {c: [] for c in clocks} for name in steps}
    order = list(steps)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            C.synchronize(device)
            start = {c: C.CLOCKS[c]() for c in clocks}
            steps[name]()
            C.synchronize(device)
            for c in clocks:
                runs[name][c].append(C.CLOCKS[c]() - start[c])
    peaks = {}
    for name, step in steps.items():
        for p in variants[name].parameters():
            p.grad = None  # the step would free them; the profiler cannot see frees of blocks it did not see allocated
        gc.collect()
        peaks[name] = C.peak_memory_bytes(step, device)
        for p in variants[name].parameters():
            p.grad = None
    return {name: dict(runs=runs[name], peak=peaks[name]) for name in steps}


def parity(reference, other, x):
    with torch.no_grad():
        a, b = reference(x).float(), other(x).float()
    return (a - b).abs().max().item(), a.abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats (< 2 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="C-Abstractor dtype; the D-Abstractor always runs fp32, as the official one",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8; quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5; quick: 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a small or shared machine more threads make CPU timings erratic; "
        "0 = torch's default)",
    )
    parser.add_argument("--projectors", nargs="+", default=["c-abs", "d-abs"], choices=["c-abs", "d-abs"])
    parser.add_argument(
        "--out", default=None, help="markdown report (default benchmarks/results/projector_official_<device>.md)"
    )
    parser.add_argument(
        "--replot", metavar="JSON", help="only redraw the plot from the .json a run wrote next to its report"
    )
    args = parser.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        print(plot([tuple(r) for r in data["rows"]], args.replot.rsplit(".", 1)[0] + ".png", data["machine"]))
        return

    C.setup_threads(args.threads)
    device = torch.device(args.device)
    dtype = C.parse_dtype(args.dtype)
    batches = args.batch or ([1] if args.quick else [1, 8])
    repeats = args.repeats or (3 if args.quick else 5)
    timm = C.import_timm()
    backends = ["auto", "torch"] if device.type == "cuda" else ["torch"]
    name_ours = (
        {"auto": "ours (Triton kernels)", "torch": "ours (PyTorch path)"}
        if device.type == "cuda"
        else {"torch": "ours"}
    )

    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    clock_note = " / ".join(clocks)
    rows, plot_data, verdicts = [], [], []
    columns = [
        "projector",
        "B",
        "implementation",
        "dtype",
        "max abs diff vs official",
        "fwd ms wall (p20–p80)",
        f"fwd time / official ({clock_note})",
        "fwd peak MiB",
        "fwd+bwd ms wall (p20–p80)",
        f"fwd+bwd time / official ({clock_note})",
        "fwd+bwd peak MiB",
        "weights MiB",
    ]
    for projector in args.projectors:
        if projector == "c-abs":
            official, ours = build_cabs(backends)
            variants = {f"official: timm {timm.__version__} RegStage + AdaptiveAvgPool2d + MLP": official}
            run_dtype = dtype
        else:
            officials, ours = build_dabs(backends, ["eager", "sdpa"])
            variants = {
                "official: transformers DeformableDetrDecoder (eager attention, as 4.38)": officials["eager"],
                "transformers DeformableDetrDecoder, sdpa attention": officials["sdpa"],
            }
            run_dtype = torch.float32
        reference_name = next(iter(variants))
        variants.update({name_ours[b]: m for b, m in ours.items()})
        for m in variants.values():
            m.to(device=device, dtype=run_dtype).eval()
        for B in batches:
            x = torch.randn(B, GRID * GRID, VISION_WIDTH, generator=torch.Generator().manual_seed(10 + B)).to(
                device=device, dtype=run_dtype
            )
            diffs = {name: parity(variants[reference_name], m, x) for name, m in variants.items()}
            results = {
                mode: measure(variants, x, mode, repeats, args.warmup, device, clocks) for mode in ("fwd", "fwd+bwd")
            }
            ratio = lambda mode, name, c, results=results, ref=reference_name: (
                C.median(results[mode][name]["runs"][c]) / C.median(results[mode][ref]["runs"][c])
            )  # noqa: E731
            for name, m in variants.items():
                diff, scale = diffs[name]
                row = [
                    projector,
                    B,
                    name,
                    str(run_dtype).replace("torch.", ""),
                    "—" if name == reference_name else f"{diff:.2e} (max abs out {scale:.2g})",
                ]
                for mode in ("fwd", "fwd+bwd"):
                    r = results[mode][name]
                    row += [
                        C.fmt_ms(C.median(r["runs"]["wall"]), r["runs"]["wall"]),
                        " / ".join(f"{ratio(mode, name, c):.2f}" for c in clocks),
                        C.fmt_mib(r["peak"]),
                    ]
                row.append(C.fmt_mib(C.tensor_bytes(m)))
                rows.append(row)
                plot_data.append(
                    (
                        projector,
                        B,
                        name,
                        {mode: {c: ratio(mode, name, c) for c in clocks} for mode in results},
                        {mode: C.median(results[mode][name]["runs"]["wall"]) for mode in results},
                        name == reference_name,
                        results["fwd"][name]["peak"],
                    )
                )
                if name.startswith("ours"):
                    peak = lambda mode, results=results, name=name, ref=reference_name: (
                        results[mode][name]["peak"] / max(results[mode][ref]["peak"], 1)
                    )  # noqa: E731
                    verdicts.append(
                        f"{projector} B={B} {name}: time / official fwd "
                        + " / ".join(f"{ratio('fwd', name, c):.2f} ({c})" for c in clocks)
                        + ", fwd+bwd "
                        + " / ".join(f"{ratio('fwd+bwd', name, c):.2f} ({c})" for c in clocks)
                        + f"; peak memory / official fwd {peak('fwd'):.2f}, fwd+bwd {peak('fwd+bwd'):.2f}"
                    )
            print(f"done {projector} B={B}", flush=True)

    title = "Projector: ours vs the official formulation (real 7B-M144 shapes)"
    extra = [
        f"shapes: CLIP ViT-L/14 @224 features (B, {GRID * GRID}, {VISION_WIDTH}) -> {QUERIES} queries -> "
        f"LM width {LM_WIDTH}; "
        f"C-Abs {CABS}; D-Abs {DABS}",
        f"median of {repeats} timed runs after {args.warmup} warm-up, variants interleaved (A B C, then C B A, ...); "
        "ratio = variant / official (first row of each block), medians of the same run",
        *(
            [
                "ratios on two clocks, `wall / cpu`: wall-clock and the CPU time of this process "
                "(time.process_time), which does not count time the cores spent on other processes"
            ]
            if len(clocks) > 1
            else []
        ),
        "peak MiB = peak of torch-allocated bytes during one call above what was live before it (weights excluded): "
        + ("torch.profiler CPU allocation events" if device.type == "cpu" else "torch.cuda.max_memory_allocated"),
        "max abs diff: outputs of the same weights on the same input, against the official row",
    ]
    lines = C.header(title, device, dtype, C.command_line(), extra)
    lines += C.table(columns, rows)
    lines += ["", "Ours against the official formulation (same run):", ""] + [f"- {v}" for v in verdicts]
    print("\n".join(lines))
    out = args.out or (C.RESULTS / f"projector_official_{device.type}{'_quick' if args.quick else ''}.md")
    C.write_report(lines, out)
    machine = C.machine_description(device)
    stem = str(out).rsplit(".", 1)[0]
    Path(stem + ".json").write_text(json.dumps({"machine": machine, "rows": plot_data}, indent=1))
    png = plot(plot_data, stem + ".png", machine)
    print(f"\nwrote {out}, {stem}.json" + (f" and {png}" if png else ""))


def plot(data, path, machine):
    """Time / official (bars: wall clock; dots: CPU-time clock; labels: wall ms) and forward peak memory / official."""
    plt = C.pyplot()
    if plt is None:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = sorted({(d[0], d[1]) for d in data})
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.0))
    panels = (
        (axes[0], "fwd", "forward time / official"),
        (axes[1], "fwd+bwd", "forward + backward time / official"),
        (axes[2], "peak", "forward peak memory / official (weights excluded)"),
    )
    for ax, mode, title in panels:
        xs, labels, offset = [], [], 0
        for p, B in groups:
            items = [d for d in data if d[0] == p and d[1] == B]
            ref = next(d for d in items if d[5])
            for i, (_, _, name, ratios, wall, is_ref, *peak) in enumerate(items):
                color = "tab:gray" if is_ref else ("tab:olive" if "sdpa" in name else "tab:blue")
                if mode == "peak":
                    value = peak[0] / max(ref[6], 1)
                    ax.bar(offset + i, value, color=color)
                    ax.text(offset + i, value, f"{peak[0] / 2**20:.0f}", ha="center", va="bottom", fontsize=7)
                    continue
                ax.bar(offset + i, ratios[mode]["wall"], color=color)
                if "cpu" in ratios[mode]:
                    ax.plot(offset + i, ratios[mode]["cpu"], "k.", markersize=5)
                ax.text(
                    offset + i,
                    ratios[mode]["wall"],
                    f"{wall[mode] * 1e3:.0f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
            xs.append(offset + (len(items) - 1) / 2)
            labels.append(f"{p}\nB={B}")
            offset += len(items) + 1
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(xs, labels)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
        ax.set_title(title + (" (labels: ms)" if mode != "peak" else " (labels: MiB)"), fontsize=9)
    handles = [
        Patch(color="tab:gray", label="official formulation"),
        Patch(color="tab:olive", label="DDETR layers, sdpa attention"),
        Patch(color="tab:blue", label="ours"),
        Line2D([], [], color="k", marker=".", linestyle="", label="CPU-time clock"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        f"Honeybee projectors at 7B-M144 shapes vs the official formulation (lower is better) — {machine}", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
