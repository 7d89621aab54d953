"""Serving throughput: vLLM (Transformers backend, continuous batching, paged KV cache) vs transformers `generate` on
the same Honeybee folder and the same requests: requests/s and generated tokens/s, and their ratio within one run.

Every request is one photo and a question (the official prompt), answered with exactly `--max-tokens` greedy tokens
(EOS ignored on both sides, so both generate the same amount of text). transformers runs the requests as padded
batches of `--batch-size` through `generate`; vLLM gets them all at once and schedules them itself.

    # CPU, a tiny random Honeybee (head_dim 32) built on the fly; < 3 min on 2 cores:
    .venvs/vllm/bin/python benchmarks/bench_vllm.py
    # CPU, the 7B converted from its archive (benchmarks/README.md), bf16; ~25 min on 2 cores, ~21 GiB:
    .venvs/vllm/bin/python benchmarks/bench_vllm.py --model /big/hb-c-7b --dtype bfloat16 --requests 8 \\
        --max-tokens 32 --batch-size 8
    # GPU, a converted 7B checkpoint (official vllm wheel), 2 GPUs for vLLM:
    python benchmarks/bench_vllm.py --model Honeybee-C-7B-M144 --dtype bfloat16 --requests 256 --max-tokens 128 \\
        --batch-size 16 --tensor-parallel-size 2

transformers runs first, vLLM second, in one process: vLLM's Transformers backend patches transformers' model
classes when its engine loads them, after which they no longer run on their own (so the two cannot be interleaved).
"""

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _common as C  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from honeybee_hf.modeling_honeybee import HoneybeeForConditionalGeneration  # noqa: E402
from honeybee_hf.processing_honeybee import HoneybeeProcessor  # noqa: E402

IMAGES = sorted((C.REPO / "assets" / "images").glob("*.jpeg"))
QUESTIONS = ["Describe the image briefly.", "What is in the image?", "What colours do you see?", "Who is there?"]


def build_requests(count):
    """(question, image) pairs, cycling through the example photos and questions."""
    photos = [Image.open(path).convert("RGB") for path in IMAGES]
    return [(QUESTIONS[i % len(QUESTIONS)], photos[i % len(photos)]) for i in range(count)]


def run_transformers(folder, requests, max_tokens, batch_size, dtype, device):
    processor = HoneybeeProcessor.from_pretrained(folder)
    model = HoneybeeForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    generation = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    inputs = [
        processor(images=[image for _, image in batch], text=[q for q, _ in batch], return_tensors="pt").to(device)
        for batch in batches
    ]

    @torch.no_grad()
    def serve():
        generated = 0
        for x in inputs:
            out = model.generate(**x, generation_config=generation)
            generated += (out.shape[1] - x["input_ids"].shape[1]) * out.shape[0]
        return generated

    return serve


def run_vllm(folder, requests, max_tokens, dtype, tensor_parallel_size):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        trust_remote_code=True,
        model_impl="transformers",
        dtype=str(dtype).replace("torch.", ""),
        limit_mm_per_prompt={"image": 1},
        tensor_parallel_size=tensor_parallel_size,
        seed=0,
    )
    engine_start = time.perf_counter() - start
    prompts = [{"prompt": question, "multi_modal_data": {"image": image}} for question, image in requests]
    processor = HoneybeeProcessor.from_pretrained(folder)
    # The official prompt (vLLM would tokenize a bare question as it is): rendered by the processor's chat template.
    for prompt, (question, _) in zip(prompts, requests):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        prompt["prompt"] = text.removeprefix(processor.tokenizer.bos_token)  # vLLM adds the BOS itself
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def serve():
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False))

    return serve, engine_start


def measure(serve, repeats, warmup, device):
    for _ in range(warmup):  # first-call allocations, kernel selection, vLLM's lazy start-up work
        serve()
    runs, tokens = [], None
    for _ in range(repeats):
        seconds, tokens = C.timed(serve, device)
        runs.append(seconds)
    return runs, tokens


def tiny_folder(directory):
    from honeybee_hf.testing_utils import VLLM_TEXT, save_tiny_hub_folder

    folder = Path(directory) / "hb_bench_vllm_tiny"
    save_tiny_hub_folder(folder, "c-abs", seed=0, text=VLLM_TEXT)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Honeybee Hub folder (default: a tiny random one, head_dim 32)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--batch-size", type=int, default=8, help="transformers' generate batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per engine first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs for vLLM")
    parser.add_argument(
        "--out", type=Path, help="markdown report (default benchmarks/results/vllm_<model>_<device>.md)"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = C.parse_dtype(args.dtype)
    requests = build_requests(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or tiny_folder(scratch)
        results = {
            "transformers generate": measure(
                run_transformers(folder, requests, args.max_tokens, args.batch_size, dtype, device),
                args.repeats,
                args.warmup,
                device,
            )
        }
        gc.collect()  # the transformers model is gone before vLLM loads its own copy (a 7B twice is 28 GB)
        serve, engine_start = run_vllm(folder, requests, args.max_tokens, dtype, args.tensor_parallel_size)
        results["vLLM"] = measure(serve, args.repeats, args.warmup, device)
    baseline = C.median(results["transformers generate"][0])
    rows = []
    for name, (runs, tokens) in results.items():
        seconds = C.median(runs)
        rows.append(
            [
                name,
                args.requests,
                tokens,
                f"{seconds:.2f} ({C.spread(runs)[0]:.2f}–{C.spread(runs)[1]:.2f})",
                f"{args.requests / seconds:.2f}",
                f"{tokens / seconds:.1f}",
                f"{baseline / seconds:.2f}",
            ]
        )
    import vllm

    model_name = "tiny" if args.model is None else args.model.name
    extra = [
        f"model: {model_name}; {args.requests} requests (one photo + a question each), {args.max_tokens} greedy tokens "
        f"each (EOS ignored); transformers in batches of {args.batch_size}; vLLM {vllm.__version__}, "
        f"Transformers backend, tensor_parallel_size {args.tensor_parallel_size}",
        f"vLLM engine start (`LLM(...)`: load, profile, KV cache): {engine_start:.0f} s",
        f"median of {args.repeats} timed runs after {args.warmup} warm-up; transformers first, then vLLM (see the "
        "docstring); "
        "speed-up = transformers' time / this engine's time, same run",
    ]
    lines = C.header("vLLM vs transformers generate", device, dtype, C.command_line(), extra)
    columns = ["engine", "requests", "generated tokens", "s (p20–p80)", "requests/s", "tokens/s", "speed-up"]
    lines += C.table(columns, rows)
    out = args.out or C.RESULTS / f"vllm_{model_name}_{device.type}.md"
    print("\n".join(lines))
    print(f"wrote {C.write_report(lines, out)}")


if __name__ == "__main__":
    sys.exit(main())
