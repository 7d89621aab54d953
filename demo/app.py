"""The Honeybee web demo: chat about a photo with streamed answers, and see where each visual token looks.

    honeybee-demo --model FOLDER_OR_REPO [--host 127.0.0.1] [--port 7860]
    HONEYBEE_MODEL=org/repo python app.py            # this file, unchanged, as a Hugging Face Space's app.py

Gradio is an optional dependency (`pip install "honeybee-hf[demo]"`), imported only when the app is built: the
handlers below take and return plain values, so they are usable (and tested) without it. Absolute imports, so the
file also runs as a Space's `app.py` next to an installed `honeybee_hf`.
"""

import argparse
import os

from honeybee_hf.cli import add_debug_flag, check_model_source, console_script
from honeybee_hf.demo.chat import (
    DECODING_MODES,
    MAX_NEW_TOKENS_LIMIT,
    BadImageError,
    HoneybeeChat,
    Sampling,
    read_image,
)
from honeybee_hf.demo.visualize import deformable_sampling_layers, token_at, token_map

MODEL_VARIABLE = "HONEYBEE_MODEL"  # what a Space sets (Settings -> Variables) to choose the model
CONCURRENCY_LIMIT = 1  # one generation at a time per process: users queue, nobody shares a half-built answer
SAMPLING_FIELDS = tuple(Sampling.__dataclass_fields__)  # the order of the sampling controls' values


def chat_messages(history):
    """(question, answer) turns -> Gradio Chatbot messages."""
    messages = []
    for question, answer in history:
        messages.append({"role": "user", "content": question})
        if answer:
            messages.append({"role": "assistant", "content": answer})
    return messages


def pick_image(upload, url):
    """The uploaded (or pasted) photo, else the URL field's image; `BadImageError` when neither can be read.

    The URL field takes http(s) URLs only: a path typed there would read files on the server."""
    url = (url or "").strip()
    if not upload and url and not url.lower().startswith(("http://", "https://")):
        raise BadImageError(f"the image URL must start with http:// or https://, got {url[:60]!r}")
    return read_image(upload if upload else url)


def answer(chat, upload, url, history, question, *sampling):
    """Stream the answer to `question`; yields (chatbot messages, history, status) after every new piece.

    A stopped answer stays in the history as far as it got (as the official demo keeps it)."""
    question = (question or "").strip()
    if not question:
        yield chat_messages(history), history, "Type a question first."
        return
    try:
        image = pick_image(upload, url)
        settings = Sampling(**dict(zip(SAMPLING_FIELDS, sampling)))
        settings.generate_kwargs()  # validates before anything runs
    except (BadImageError, ValueError, TypeError) as error:
        yield chat_messages(history), history, f"⚠️ {error}"
        return
    turns = [*history, (question, "")]
    yield chat_messages(turns), turns, ""
    for text in chat.stream(image, history, question, settings):
        turns = [*history, (question, text)]
        yield chat_messages(turns), turns, ""


def regenerate(chat, upload, url, history, *sampling):
    """Answer the last question again (with the current settings)."""
    if not history:
        yield chat_messages(history), history, "Nothing to regenerate yet."
        return
    *earlier, (question, _) = history
    yield from answer(chat, upload, url, earlier, question, *sampling)


def show_token_map(chat, upload, url, token, layer):
    """(overlay image or None, caption) for visual token `token`; `layer` is "all" or a 1-based decoder layer."""
    try:
        image = pick_image(upload, url)
        with chat.lock:
            return token_map(
                chat.model, chat.processor, image, int(token), None if layer in (None, "all") else int(layer) - 1
            )
    except (BadImageError, ValueError) as error:
        return None, f"⚠️ {error}"


def clicked_token(chat, upload, url, xy):
    """The token under a click at pixel `xy` = (x, y) of the photo."""
    image = pick_image(upload, url)
    return token_at(chat.model, xy[0] / image.width, xy[1] / image.height)


def build_app(chat, title):
    """The Gradio Blocks app over one loaded `HoneybeeChat`."""
    import gradio as gr

    defaults = Sampling()
    num_tokens = chat.model.config.projector_config.num_query_tokens
    layers = deformable_sampling_layers(chat.model)
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# Honeybee\n`{title}`: ask about a photo; see where each of its {num_tokens} visual tokens looks."
        )
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Photo", elem_id="photo")
                url = gr.Textbox(label="…or an image URL", placeholder="https://…", elem_id="url")
                with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                    controls = dict(
                        mode=gr.Radio(list(DECODING_MODES), value=defaults.mode, label="Decoding", elem_id="decoding"),
                        max_new_tokens=gr.Slider(
                            1, MAX_NEW_TOKENS_LIMIT, value=defaults.max_new_tokens, step=1, label="Max new tokens"
                        ),
                        temperature=gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature"),
                        top_k=gr.Slider(1, 100, value=defaults.top_k, step=1, label="Top-k"),
                        top_p=gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
                        num_beams=gr.Slider(2, 8, value=defaults.num_beams, step=1, label="Beams (beam search)"),
                        no_repeat_ngram_size=gr.Slider(
                            0,
                            6,
                            value=defaults.no_repeat_ngram_size,
                            step=1,
                            label="No-repeat n-gram size",
                            elem_id="no-repeat",
                        ),
                        length_penalty=gr.Slider(
                            -2.0, 2.0, value=defaults.length_penalty, step=0.1, label="Length penalty (beam search)"
                        ),
                    )
                    sampling = [controls[name] for name in SAMPLING_FIELDS]
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=360)
                    question = gr.Textbox(
                        label="Question", placeholder="Describe the image briefly.", elem_id="question"
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", elem_id="stop")
                        again = gr.Button("Regenerate", elem_id="regenerate")
                        clear = gr.Button("Clear", elem_id="clear")
                    status = gr.Markdown(elem_id="status")
                with gr.Tab("Where each visual token looks", elem_id="token-tab"):
                    gr.Markdown("Pick a token (row-major on the square map) or click the map.")
                    with gr.Row():
                        token = gr.Slider(
                            0, num_tokens - 1, value=num_tokens // 2, step=1, label="Visual token", elem_id="token"
                        )
                        layer = gr.Dropdown(
                            ["all", *map(str, range(1, layers + 1))],
                            value="all",
                            label="Decoder layer",
                            visible=layers > 0,
                        )
                    show = gr.Button("Show", variant="primary", elem_id="show-map")
                    overlay = gr.Image(label="Token map", interactive=False, height=360, elem_id="token-map")
                    caption = gr.Markdown(elem_id="token-caption")

        def on_answer(upload, url, history, question, *values):
            yield from answer(chat, upload, url, history, question, *values)

        def on_regenerate(upload, url, history, *values):
            yield from regenerate(chat, upload, url, history, *values)

        def on_map(upload, url, token, layer):
            return show_token_map(chat, upload, url, token, layer)

        def on_click(upload, url, layer, event: gr.SelectData):
            picked = clicked_token(chat, upload, url, event.index)
            return picked, *show_token_map(chat, upload, url, picked, layer)

        outputs = [chatbot, history, status]
        asked = send.click(on_answer, [upload, url, history, question, *sampling], outputs)
        submitted = question.submit(on_answer, [upload, url, history, question, *sampling], outputs)
        redone = again.click(on_regenerate, [upload, url, history, *sampling], outputs)
        stop.click(None, cancels=[asked, submitted, redone])
        for event in (asked, submitted):
            event.then(lambda: "", None, question)
        reset = dict(fn=lambda: ([], [], ""), inputs=None, outputs=outputs, cancels=[asked, submitted, redone])
        clear.click(**reset)
        upload.change(**reset)  # a new photo starts a new conversation, as the prompt holds one image
        show.click(on_map, [upload, url, token, layer], [overlay, caption])
        overlay.select(on_click, [upload, url, layer], [token, overlay, caption])
    app.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return app


@console_script("honeybee-demo")
def main(argv):
    parser = argparse.ArgumentParser(prog="honeybee-demo", description="The Honeybee web demo (Gradio).")
    parser.add_argument("--model", help=f"a Honeybee folder or Hub repo (default: ${MODEL_VARIABLE})")
    parser.add_argument("--host", help="address to serve on (default: 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, help="port (default: 7860, or $GRADIO_SERVER_PORT)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    model = args.model or os.environ.get(MODEL_VARIABLE)
    if not model:
        raise ValueError(f"no model: pass --model FOLDER_OR_REPO or set {MODEL_VARIABLE}")
    check_model_source(model, "--model")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("honeybee-demo needs Gradio: pip install 'honeybee-hf[demo]'") from None
    app = build_app(HoneybeeChat.load(model), title=model)
    app.launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
