"""End-to-end generation: Honeybee against transformers' LLaVA-1.5 and against the bare Llama it wraps.

Part 1, prefill and decode: Honeybee-C-M144 (224 px), C-M256 (336 px) and D-M144 (224 px) against transformers'
`LlavaForConditionalGeneration` (576 visual tokens at 336 px, 2-layer GELU MLP projector, CLIP layer -2), built
from configs with random weights and the same CLIP and Llama sizes. A LLaVA at 224 px (256 visual tokens) is the
same-resolution row: against C-M144 it isolates the effect of the visual-token count (256 vs 144) from the image
resolution. All models share ONE Llama instance (same weights, counted once per model in its memory). Measured
with `generate` (greedy, exactly `--new-tokens` tokens): time to first token (TTFT: the generate call until the
first token exists: vision tower + projector + LLM prefill), decode tokens/s (batch x tokens / time of the
remaining steps), peak memory.

Part 2, wrapper overhead: decode steps of Honeybee-C-M144 against that same `LlamaForCausalLM` called directly
with a text prompt of the same total length (144 + L tokens), so that both do identical LLM work per step and only
the wrapper differs (LLaVA against the bare Llama at 576 + L is printed for comparison). To compare many decode
steps without paying a prefill each time, every call resumes from a copy of a KV cache prefilled with all but the
last prompt token, so `generate` runs decode-shaped steps only (through the model's own
prepare_inputs_for_generation and forward, as in any generate). The two models alternate (A B, B A, ...); the
overhead is the median over pairs of the ratio of their median step times, and the CPU-time difference per step.

Sizes: `--size small` (default) shrinks CLIP and Llama keeping real token counts (224/336 px, patch 14, 144/256/576
visual tokens) and roughly the real ratio of vision-tower to LLM cost per token; `--size 7b` is CLIP ViT-L/14 +
Vicuna-7B (meant for a GPU: `--device cuda --dtype bfloat16`).

    python benchmarks/bench_e2e.py --quick                 # < 2 min on 2 CPU cores
    python benchmarks/bench_e2e.py                         # batch 1 and 8, prompt 32 and 512
    python benchmarks/bench_e2e.py --size 7b --device cuda --dtype bfloat16
"""

import argparse
import copy
import gc
import json
from pathlib import Path

import _common as C
import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.generation import StoppingCriteria, StoppingCriteriaList

from honeybee_hf.configuration_honeybee import HoneybeeConfig
from honeybee_hf.modeling_honeybee import HoneybeeForConditionalGeneration

IMAGE_TOKEN = 32000
VOCAB = 32001

SIZES = {
    # CLIP ViT-L/14 + Vicuna-7B-v1.5: per token ~0.30 B vision vs ~6.5 B LLM parameters (ratio ~0.047)
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        cabs=dict(hidden_size=1024, depth=3, mlp_depth=2),
        dabs=dict(d_model=1024, decoder_layers=6, decoder_attention_heads=8, decoder_n_points=4, decoder_ffn_dim=1024),
    ),
    # Same structure, shrunk to run on 2 CPU cores; vision/LLM parameters per token ~0.8 M / ~17 M (ratio ~0.05).
    "small": dict(
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        text=dict(
            hidden_size=512, intermediate_size=1408, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=8
        ),
        cabs=dict(hidden_size=128, depth=3, mlp_depth=2),
        dabs=dict(d_model=128, decoder_layers=6, decoder_attention_heads=8, decoder_n_points=4, decoder_ffn_dim=128),
    ),
}

# name -> (kind, image size, projector type, visual tokens)
MODELS = {
    "LLaVA-1.5 @336": ("llava", 336, None, 576),
    "LLaVA-1.5 @224 (same res. as M144)": ("llava", 224, None, 256),
    "Honeybee-C-M144 @224": ("honeybee", 224, "c-abs", 144),
    "Honeybee-C-M256 @336": ("honeybee", 336, "c-abs", 256),
    "Honeybee-D-M144 @224": ("honeybee", 224, "d-abs", 144),
}
REFERENCE = "LLaVA-1.5 @336"
SAME_RESOLUTION = "LLaVA-1.5 @224 (same res. as M144)"
C_M144 = "Honeybee-C-M144 @224"  # the model the targets are set for


def vision_config(size, image_size):
    return CLIPVisionConfig(
        **SIZES[size]["vision"], image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu"
    )


def text_config(size, num_hidden_layers=None):
    text = dict(SIZES[size]["text"])
    if num_hidden_layers is not None:
        text["num_hidden_layers"] = num_hidden_layers
    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **text,
    )


def build_models(size, device, dtype, names=tuple(MODELS)):
    """The models `names` (keys of MODELS) plus the bare Llama they share; built on `device` in `dtype`, random
    weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    models = {}
    try:
        with torch.device(device):
            # Both models have LLaVA's layout (`model.language_model` + `lm_head`): each is built with a 1-layer
            # Llama that is then replaced by this shared one.
            shared = LlamaForCausalLM(text_config(size))
            for name in names:
                kind, image_size, projector, _ = MODELS[name]
                if kind == "honeybee":
                    projector_config = dict(
                        projector_type=projector,
                        num_query_tokens=MODELS[name][3],
                        **SIZES[size]["cabs" if projector == "c-abs" else "dabs"],
                    )
                    config = HoneybeeConfig(
                        vision_config=vision_config(size, image_size),
                        projector_config=projector_config,
                        text_config=text_config(size, 1),
                        image_token_id=IMAGE_TOKEN,
                    )
                    config._attn_implementation = "sdpa"
                    model = HoneybeeForConditionalGeneration(config)
                    if projector == "d-abs":
                        # the D-Abstractor runs fp32, as the official one and our from_pretrained
                        model.abstractor.float()
                else:
                    config = LlavaConfig(
                        vision_config=vision_config(size, image_size),
                        text_config=text_config(size, 1),
                        image_token_index=IMAGE_TOKEN,
                        image_seq_length=MODELS[name][3],
                        projector_hidden_act="gelu",
                        vision_feature_layer=-2,
                        vision_feature_select_strategy="default",
                    )
                    config._attn_implementation = "sdpa"
                    model = LlavaForConditionalGeneration(config)
                model.model.language_model = shared.model
                model.lm_head = shared.lm_head
                model.config.text_config = shared.config
                models[name] = model.eval()
                gc.collect()
    finally:
        torch.set_default_dtype(previous)
    return models, shared.eval()


def prefill_flops(size, dtype, batches, prompts):
    """{(B, L, name): (vision tower + projector FLOPs, whole prefill FLOPs)} of every model, counted by torch's
    FlopCounterMode on the meta device: no memory, no time, so the 7B shapes can be counted on any machine.
    The LLM part is the shared Llama on the M + L prompt, logits for the last token only (as generate's prefill);
    torch's counter counts attention as the full T x T product."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    models, llama = build_models(size, meta, dtype)
    for m in [*models.values(), llama]:
        m.requires_grad_(False)  # FlopCounterMode's module tracker trips over params needing grad on meta
    out = {}
    for batch in batches:
        for prompt in prompts:
            for name, model in models.items():
                kind, image_size, _, visual_tokens = MODELS[name]
                with FlopCounterMode(display=False) as counter, torch.no_grad():
                    pixels = torch.zeros(batch, 3, image_size, image_size, device=meta, dtype=dtype)
                    if kind == "honeybee":
                        model.get_image_features(pixels, return_dict=False)
                    else:
                        model.model.get_image_features(
                            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
                        )
                    vision = counter.get_total_flops()
                    T = visual_tokens + prompt
                    embeds = torch.zeros(batch, T, llama.config.hidden_size, device=meta, dtype=dtype)
                    # explicit 4-D mask and positions: the mask helpers would call .item() (impossible on meta)
                    mask = torch.ones(batch, 1, T, T, dtype=torch.bool, device=meta).tril()
                    positions = torch.arange(T, device=meta)[None].expand(batch, -1)
                    llama(
                        inputs_embeds=embeds,
                        attention_mask=mask,
                        position_ids=positions,
                        logits_to_keep=1,
                        use_cache=False,
                    )
                out[(batch, prompt, name)] = (vision, counter.get_total_flops())
    return out


def flops_table(flops, batches, prompts):
    rows = []
    for batch in batches:
        for prompt in prompts:
            ref = flops[(batch, prompt, REFERENCE)][1]
            for name in MODELS:
                vision, total = flops[(batch, prompt, name)]
                rows.append(
                    [
                        batch,
                        prompt,
                        name,
                        MODELS[name][3] + prompt,
                        f"{vision / 1e9:,.1f}",
                        f"{(total - vision) / 1e9:,.1f}",
                        f"{total / 1e9:,.1f}",
                        f"{total / ref:.2f}",
                    ]
                )
    return C.table(
        [
            "B",
            "L (text)",
            "model",
            "prompt tokens",
            "vision + projector GFLOP",
            "LLM prefill GFLOP",
            "total GFLOP",
            "total / LLaVA@336",
        ],
        rows,
    )


class Stamps(StoppingCriteria):
    """Records when each new token exists (generate calls stopping criteria once per token), on every clock."""

    def __init__(self, device, clocks):
        self.device, self.clocks = device, clocks
        self.times = {c: [] for c in clocks}

    def __call__(self, input_ids, scores, **kwargs):
        C.synchronize(self.device)
        for c in self.clocks:
            self.times[c].append(C.CLOCKS[c]())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def make_inputs(kind, visual_tokens, image_size, batch, prompt, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN, (batch, prompt), generator=g)
    if kind == "llama":
        ids = torch.cat([torch.randint(3, IMAGE_TOKEN, (batch, visual_tokens), generator=g), text], dim=1)
        return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device))
    ids = torch.cat([torch.full((batch, visual_tokens), IMAGE_TOKEN), text], dim=1)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g).to(device=device, dtype=dtype)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device), pixel_values=pixels)


def generate_once(model, inputs, new_tokens, device, clocks=("wall",)):
    """One greedy generate of exactly `new_tokens` tokens -> {clock: (ttft, [decode step times])}."""
    stamps = Stamps(device, clocks)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    C.synchronize(device)
    start = {c: C.CLOCKS[c]() for c in clocks}
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([stamps]))
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens or out.shape[1] == new_tokens, out.shape
    result = {}
    for c in clocks:
        t = stamps.times[c]
        result[c] = (t[0] - start[c], [b - a for a, b in zip(t, t[1:])])
    return result


def run_case(variants, batch, prompt, args, device, dtype, clocks):
    """variants: {name: (model, kind, visual_tokens, image_size)}, run interleaved in this order.

    Returns {name: {clock: dict(ttft=[per run], steps=[[per step] per run]), "peak": bytes}}."""
    inputs = {
        name: make_inputs(kind, vt, size, batch, prompt, device, dtype, seed=batch * 1000 + prompt)
        for name, (_, kind, vt, size) in variants.items()
    }
    for _ in range(args.warmup):  # short: the first calls of a shape set up kernels and allocator pools
        for name, (model, *_rest) in variants.items():
            generate_once(model, inputs[name], 2, device)
    stats = {name: {c: dict(ttft=[], steps=[]) for c in clocks} for name in variants}
    order = list(variants)
    for repeat in range(args.repeats):
        # forward on even runs, backward on odd ones: neither drift nor "who runs first" favours a variant
        for name in order if repeat % 2 == 0 else order[::-1]:
            model = variants[name][0]
            for c, (ttft, steps) in generate_once(model, inputs[name], args.new_tokens, device, clocks).items():
                stats[name][c]["ttft"].append(ttft)
                stats[name][c]["steps"].append(steps)
    for name, (model, *_rest) in variants.items():
        gc.collect()
        call = lambda model=model, inputs=inputs[name]: generate_once(model, inputs, args.new_tokens, device)  # noqa: E731
        stats[name]["peak"] = C.peak_memory_bytes(call, device)
    return stats


def prefilled_cache(model, inputs):
    """KV cache of the prompt without its last token (the image included), for decode-only generate calls."""
    head = {k: (v[:, :-1] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**head, use_cache=True).past_key_values


def decode_only(model, inputs, cache, new_tokens, device, clocks):
    """generate from a copy of `cache`: every step is a one-token step -> {clock: [step times]}."""
    tail = {k: v for k, v in inputs.items() if k != "pixel_values"}  # the image is in the cache already
    result = generate_once(model, dict(tail, past_key_values=copy.deepcopy(cache)), new_tokens, device, clocks)
    return {c: steps for c, (_, steps) in result.items()}


class LLMProbe:
    """Times every call of the shared Llama's decoder stack and lm_head (forward hooks), on every clock. A decode
    step's time minus these is the time spent outside the LLM: generate's loop, prepare_inputs_for_generation and
    the wrapper's forward. The wrapped and the bare model do the same LLM work, so the difference of their
    outside-the-LLM times is the wrapper's cost, without the noise of the LLM's own compute."""

    def __init__(self, llama, device, clocks):
        self.device, self.clocks = device, clocks
        self.times = {c: [] for c in clocks}  # per LLM call: decoder + lm_head time
        self._start, self._pending = None, {c: 0.0 for c in clocks}
        self.handles = []
        for module, last in ((llama.model, False), (llama.lm_head, True)):
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(lambda m, a, o, last=last: self._post(last)))

    def _pre(self, module, args):
        C.synchronize(self.device)
        self._start = {c: C.CLOCKS[c]() for c in self.clocks}

    def _post(self, last):
        C.synchronize(self.device)
        for c in self.clocks:
            self._pending[c] += C.CLOCKS[c]() - self._start[c]
            if last:  # lm_head closes one LLM call
                self.times[c].append(self._pending[c])
                self._pending[c] = 0.0

    def take(self):
        times, self.times = self.times, {c: [] for c in self.clocks}
        return times

    def remove(self):
        for handle in self.handles:
            handle.remove()


def measure_overhead(pairs, llama, batch, prompt, args, device, dtype, clocks):
    """pairs: [(wrapped name, wrapped model, visual tokens, image size)], each against `llama` alone.

    Returns [(name, {"wrapped"|"bare": {clock: dict(steps=[[s] per run], outside=[[s] per run])}})]."""
    results = []
    probe = LLMProbe(llama, device, clocks)
    try:
        for name, wrapped, visual_tokens, image_size in pairs:
            seed = 7 + batch * 1000 + prompt
            inputs = {
                "wrapped": make_inputs(MODELS[name][0], visual_tokens, image_size, batch, prompt, device, dtype, seed),
                "bare": make_inputs("llama", visual_tokens, None, batch, prompt, device, dtype, seed),
            }
            models = {"wrapped": wrapped, "bare": llama}
            caches = {k: prefilled_cache(models[k], inputs[k]) for k in models}
            for k in models:  # warm-up
                decode_only(models[k], inputs[k], caches[k], 2, device, clocks)
            stats = {k: {c: dict(steps=[], outside=[]) for c in clocks} for k in models}
            for repeat in range(args.overhead_repeats):
                for k in ("wrapped", "bare") if repeat % 2 == 0 else ("bare", "wrapped"):
                    probe.take()
                    run = decode_only(models[k], inputs[k], caches[k], args.new_tokens, device, clocks)
                    inside = probe.take()
                    for c in clocks:
                        assert len(inside[c]) == len(run[c]) + 1, (len(inside[c]), len(run[c]))
                        stats[k][c]["steps"].append(run[c])
                        # step i spans LLM call i + 1 (call 0 produced the first token)
                        stats[k][c]["outside"].append([s - t for s, t in zip(run[c], inside[c][1:])])
            results.append((name, stats))
            del caches
            gc.collect()
    finally:
        probe.remove()
    return results


def step_time(runs):
    """Median decode step over all steps of all runs."""
    return C.median([s for run in runs for s in run])


def paired_overhead(wrapped_runs, bare_runs):
    """Per run r: median step of wrapped run r / median step of bare run r (they ran back to back, in alternating
    order) - 1."""
    return [C.median(w) / C.median(b) - 1 for w, b in zip(wrapped_runs, bare_runs)]


def parse_args(argv=None):
    """The command line, with the defaults that depend on `--quick` filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 1, prompts 32 and 512, 3 runs, 8 new tokens (< 2 min on 2 CPU cores)",
    )
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 8 (quick: 1)")
    parser.add_argument("--prompt", type=int, nargs="+", default=[32, 512], help="text tokens after the image")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per call (default 32; quick: 8)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed generate calls per variant and case (default 5; quick: 3)"
    )
    parser.add_argument(
        "--overhead-repeats",
        type=int,
        default=None,
        help="decode-only calls per model in part 2 (default 12; quick: 4)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a small or shared machine more threads make CPU timings erratic; 0 = "
        "torch's default)",
    )
    parser.add_argument(
        "--replot", metavar="JSON", help="only redraw the plot from the .json a run wrote next to its report"
    )
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="only count the prefill FLOPs (meta device: instant, any size, any machine)",
    )
    parser.add_argument(
        "--out", default=None, help="markdown report (default benchmarks/results/e2e_<size>_<device>.md)"
    )
    args = parser.parse_args(argv)
    args.batch = args.batch or ([1] if args.quick else [1, 8])
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.overhead_repeats = args.overhead_repeats or (4 if args.quick else 12)
    return args


def replot(path):
    """Redraw the plot of a run from the .json it wrote next to its report -> the plot's path (None without
    matplotlib)."""
    data = json.loads(Path(path).read_text())
    return plot([tuple(r) for r in data["rows"]], path.rsplit(".", 1)[0] + ".png", data["subtitle"])


def size_description(size_name):
    size = SIZES[size_name]
    return (
        f"size `{size_name}`: CLIP {size['vision']} (patch 14); Llama {size['text']}, vocab {VOCAB}; C-Abs "
        f"{size['cabs']}; D-Abs {size['dabs']} (fp32)"
    )


def flops_report(args, dtype, flops):
    """The `--flops-only` report: the run header and the FLOPs table."""
    lines = C.header(
        f"Prefill FLOPs, size `{args.size}` (counted, not timed)",
        torch.device("meta"),
        dtype,
        C.command_line(),
        [
            size_description(args.size),
            "torch.utils.flop_counter.FlopCounterMode on the meta device (matmuls, convolutions, attention as full "
            "T x T): "
            "the machine plays no part; the LLM part computes logits for the last token only, as generate's "
            "prefill does",
        ],
    )
    return lines + flops_table(flops, args.batch, args.prompt)


def part1_rows(stats, batch, prompt, flops, weights, clocks):
    """Part 1 of one case (batch, prompt): its table rows, and the ratios to LLaVA@336 that the plot draws."""
    ref = stats[REFERENCE]
    rows, plot_rows = [], []
    for name in MODELS:
        s = stats[name]
        row = [
            batch,
            prompt,
            name,
            MODELS[name][3],
            MODELS[name][3] + prompt,
            f"{flops[(batch, prompt, name)][1] / flops[(batch, prompt, REFERENCE)][1]:.2f}",
        ]
        w = s["wall"]
        row += [C.fmt_ms(C.median(w["ttft"]), w["ttft"])]
        row += [" / ".join(f"{C.median(s[c]['ttft']) / C.median(ref[c]['ttft']):.2f}" for c in clocks)]
        rates = [batch * len(r) / sum(r) for r in w["steps"]]
        lo, hi = C.spread(rates)
        row += [f"{batch / step_time(w['steps']):.1f} ({lo:.3g}–{hi:.3g})"]
        row += [" / ".join(f"{step_time(ref[c]['steps']) / step_time(s[c]['steps']):.2f}" for c in clocks)]
        row += [C.fmt_mib(weights[name] + s["peak"]), C.fmt_mib(s["peak"])]
        rows.append(row)
        plot_rows.append(
            (
                batch,
                prompt,
                name,
                {c: C.median(s[c]["ttft"]) / C.median(ref[c]["ttft"]) for c in clocks},
                {c: step_time(ref[c]["steps"]) / step_time(s[c]["steps"]) for c in clocks},
            )
        )
    return rows, plot_rows


def ttft_verdict(stats, batch, prompt, clocks):
    """The TTFT target of one case: C-M144 at most 0.4x LLaVA@336 (and, for reference, the same-resolution ratio)."""
    ratios = {c: C.median(stats[C_M144][c]["ttft"]) / C.median(stats[REFERENCE][c]["ttft"]) for c in clocks}
    same = {c: C.median(stats[C_M144][c]["ttft"]) / C.median(stats[SAME_RESOLUTION][c]["ttft"]) for c in clocks}
    met = [r <= 0.4 for r in ratios.values()]
    verdict = "met" if all(met) else "MISSED" if not any(met) else "met on one clock only"
    return (
        f"B={batch} L={prompt}: TTFT C-M144 / LLaVA@336 = "
        + " / ".join(f"{ratios[c]:.2f} ({c})" for c in clocks)
        + f" -> target <= 0.4 {verdict}"
        + "; C-M144 / LLaVA@224 (same resolution) = "
        + " / ".join(f"{same[c]:.2f} ({c})" for c in clocks)
    )


def part2_rows(overhead, batch, prompt, clocks):
    """Part 2 of one case from `measure_overhead`'s results: its table rows, and the verdict on the wrapper-overhead
    target (C-M144 at most +2% of a bare step)."""
    rows, verdicts = [], []
    for wrapped, st in overhead:
        w, b = st["wrapped"], st["bare"]
        row = [
            batch,
            prompt,
            wrapped,
            MODELS[wrapped][3] + prompt,
            f"{step_time(w['wall']['steps']) * 1e3:.2f}",
            f"{step_time(b['wall']['steps']) * 1e3:.2f}",
        ]
        overheads = {}
        for c in clocks:
            paired = paired_overhead(w[c]["steps"], b[c]["steps"])
            overheads[c] = C.median(paired)
            lo, hi = C.spread(paired)
            row.append(f"{overheads[c] * 100:+.1f}% ({lo * 100:+.1f} to {hi * 100:+.1f})")
        clock = clocks[-1]  # CPU time on a CPU, wall on a GPU
        per_run = lambda runs: C.median([C.median(r) for r in runs])
        outside_w, outside_b = per_run(w[clock]["outside"]), per_run(b[clock]["outside"])
        deltas = [C.median(x) - C.median(y) for x, y in zip(w[clock]["outside"], b[clock]["outside"])]
        delta, bare_step = C.median(deltas), step_time(b[clock]["steps"])
        lo, hi = C.spread(deltas)
        row += [
            f"{outside_w * 1e6:.0f} / {outside_b * 1e6:.0f}",
            f"{delta * 1e6:+.0f} ({lo * 1e6:+.0f} to {hi * 1e6:+.0f})",
            f"{delta / bare_step * 100:+.2f}%",
        ]
        rows.append(row)
        if wrapped == C_M144:
            verdicts.append(
                f"B={batch} L={prompt}: Honeybee decode step vs bare Llama: the wrapper costs "
                f"{delta * 1e6:+.0f} µs per step outside the LLM "
                f"({clock} clock) = {delta / bare_step * 100:+.2f}% of a bare step -> target <= +2% "
                f"{'met' if delta / bare_step <= 0.02 else 'MISSED'}; "
                "whole steps compared directly: " + " / ".join(f"{overheads[c] * 100:+.1f}% ({c})" for c in clocks)
            )
    return rows, verdicts


def measure(args, device, dtype, flops, clocks):
    """Both parts for every case (batch, prompt) -> (part 1 rows, part 2 rows, plot rows, target verdicts)."""
    models, llama = build_models(args.size, device, dtype)
    weights = {name: C.tensor_bytes(m) for name, m in models.items()}
    part1, part2, plot_rows, verdicts = [], [], [], []
    for batch in args.batch:
        for prompt in args.prompt:
            variants = {name: (m, MODELS[name][0], MODELS[name][3], MODELS[name][1]) for name, m in models.items()}
            stats = run_case(variants, batch, prompt, args, device, dtype, clocks)
            rows, plotted = part1_rows(stats, batch, prompt, flops, weights, clocks)
            part1 += rows
            plot_rows += plotted
            verdicts.append(ttft_verdict(stats, batch, prompt, clocks))
            pairs = [(C_M144, models[C_M144], 144, 224), (REFERENCE, models[REFERENCE], 576, 336)]
            overhead = measure_overhead(pairs, llama, batch, prompt, args, device, dtype, clocks)
            rows, overhead_verdicts = part2_rows(overhead, batch, prompt, clocks)
            part2 += rows
            verdicts += overhead_verdicts
            print(f"done B={batch} L={prompt}", flush=True)
    return part1, part2, plot_rows, verdicts


def report(args, device, dtype, clocks, part1, part2, verdicts):
    """The markdown report: the run header with what was measured how, the tables of both parts, the targets."""
    clock_note = " / ".join(clocks)
    extra = [
        size_description(args.size),
        f"generate: greedy, exactly {args.new_tokens} new tokens, sdpa attention, KV cache; {args.warmup} short "
        f"warm-up + {args.repeats} timed calls per variant, variants interleaved (A B C ... then ... C B A)",
        "TTFT = median time from the generate call to the first token (vision tower + projector + LLM prefill); "
        "decode tok/s = batch / median time between consecutive tokens (all steps of all runs); p20–p80 over runs in "
        "brackets",
        (
            "ratios are given on two clocks, `wall / cpu`: wall-clock, and the CPU time of this process "
            "(time.process_time), "
            "which does not count time the cores spent on other processes; when they disagree, the machine was busy"
            if len(clocks) > 1
            else "clock: wall time, CUDA synchronised at every token"
        ),
        "peak MiB = weights of the model (the shared Llama counted in full for each) + peak of torch-allocated bytes "
        "during one generate call "
        + ("(torch.profiler CPU allocation events)" if device.type == "cpu" else "(torch.cuda.max_memory_allocated)")
        + "; 'during' is that second part alone",
        f"part 1 ratios are against {REFERENCE} in the same run; 'prefill FLOPs' is counted (FlopCounterMode, see "
        f"--flops-only), not timed",
        f"part 2: {args.overhead_repeats} decode-only generate calls of {args.new_tokens} tokens per model, resumed "
        f"from a prefilled KV cache, "
        "wrapped and bare alternating. 'whole step' = median over back-to-back pairs of (median step wrapped / median "
        "step bare) − 1, "
        "p20 to p80 over pairs in brackets: the direct comparison, as noisy as the LLM's compute. 'outside the LLM' = "
        "step time minus the time "
        "inside the shared Llama's decoder stack and lm_head (forward hooks on both models): the wrapped-minus-bare "
        "difference of it is the "
        "wrapper's cost per step (generate loop, prepare_inputs_for_generation, the wrapper's forward), free of the "
        "LLM's noise",
    ]
    lines = C.header(f"End-to-end generation, size `{args.size}`", device, dtype, C.command_line(), extra)
    lines += ["### Part 1: prefill and decode vs LLaVA-1.5", ""]
    lines += C.table(
        [
            "B",
            "L (text)",
            "model",
            "visual tokens",
            "prompt tokens",
            "prefill FLOPs / LLaVA@336",
            "TTFT ms wall (p20–p80)",
            f"TTFT / LLaVA@336 ({clock_note})",
            "decode tok/s wall (p20–p80)",
            f"decode speed / LLaVA@336 ({clock_note})",
            "peak MiB",
            "during generate MiB",
        ],
        part1,
    )
    lines += [
        "",
        "### Part 2: decode overhead of the wrapper vs the bare Llama (same weights, same sequence length)",
        "",
    ]
    lines += C.table(
        [
            "B",
            "L (text)",
            "wrapped model (vs the bare Llama)",
            "sequence before decode",
            "wrapped ms/step (wall)",
            "bare ms/step (wall)",
            *[f"whole step: wrapped / bare − 1, {c} clock (p20 to p80)" for c in clocks],
            f"outside the LLM µs/step wrapped / bare ({clocks[-1]}, median of run medians)",
            "wrapper cost µs/step (p20 to p80)",
            "wrapper cost / bare step",
        ],
        part2,
    )
    return lines + ["", "### Targets", ""] + [f"- {v}" for v in verdicts]


def save_results(lines, plot_rows, args, device):
    """The report, the plot's data (.json, what `--replot` reads) and the plot, side by side."""
    out = args.out or (C.RESULTS / f"e2e_{args.size}_{device.type}{'_quick' if args.quick else ''}.md")
    C.write_report(lines, out)
    subtitle = f"size {args.size}, {C.machine_description(device)}, {args.dtype}"
    stem = str(out).rsplit(".", 1)[0]
    Path(stem + ".json").write_text(json.dumps({"subtitle": subtitle, "rows": plot_rows}, indent=1))
    png = plot(plot_rows, stem + ".png", subtitle)
    print(f"\nwrote {out}, {stem}.json" + (f" and {png}" if png else ""))


def plot(rows, path, subtitle):
    """Bars: wall-clock ratios to LLaVA-1.5@336; black dots: the same ratios on the CPU-time clock."""
    plt = C.pyplot()
    if plt is None:
        return None
    cases = sorted({(b, length) for b, length, *_ in rows})
    names = list(MODELS)
    colors = ["tab:gray", "silver", "tab:orange", "gold", "tab:blue"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.0))
    width = 0.8 / len(names)
    for ax, index, label in (
        (axes[0], 3, "time to first token / LLaVA-1.5@336 (lower is better)"),
        (axes[1], 4, "decode speed / LLaVA-1.5@336 (higher is better)"),
    ):
        for i, name in enumerate(names):
            xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cases))]
            picked = [
                next(r[index] for r in rows if r[0] == b and r[1] == length and r[2] == name) for b, length in cases
            ]
            ax.bar(xs, [p["wall"] for p in picked], width, label=name, color=colors[i % len(colors)])
            if "cpu" in picked[0]:
                ax.plot(xs, [p["cpu"] for p in picked], "k.", markersize=4, label="CPU-time clock" if i == 0 else None)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if index == 3:
            ax.axhline(0.4, color="tab:red", linewidth=0.8, linestyle="--", label="target 0.4x (C-M144)")
        ax.set_xticks(range(len(cases)), [f"B={b}, L={length}" for b, length in cases])
        ax.set_title(label, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Honeybee vs LLaVA-1.5 (same CLIP and Llama sizes, random weights) — {subtitle}", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def main():
    args = parse_args()
    if args.replot:
        print(replot(args.replot))
        return

    C.setup_threads(args.threads)
    device, dtype = torch.device(args.device), C.parse_dtype(args.dtype)
    flops = prefill_flops(args.size, dtype, args.batch, args.prompt)
    if args.flops_only:
        lines = flops_report(args, dtype, flops)
        print("\n".join(lines))
        out = args.out or (C.RESULTS / f"e2e_{args.size}_flops.md")
        C.write_report(lines, out)
        print(f"\nwrote {out}")
        return

    # CPU time of the process is blind to other processes taking the cores; on a GPU it means nothing.
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    part1, part2, plot_rows, verdicts = measure(args, device, dtype, flops, clocks)
    lines = report(args, device, dtype, clocks, part1, part2, verdicts)
    print("\n".join(lines))
    save_results(lines, plot_rows, args, device)


if __name__ == "__main__":
    main()
