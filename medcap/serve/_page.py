"""The web page (Gradio, mounted at ``/`` on the API's server).

Upload an image (PNG, JPEG or DICOM) or pick a demo example: the image shows at once
as the model sees it (after resize and centre crop); press Caption, ask questions in a
chat that keeps the conversation. The page calls the same code as the API
(``ServeState.prepare`` and the batching worker), with the file's bytes as they
were uploaded, so its answer for an image equals the API's for the same bytes.
What a user got wrong (no image yet, a file that is no image) is a message on the
page, not a traceback in the server's log.

    ask, as_seen  one conversation about an uploaded file -> (answer, image as seen);
                  the uploaded file as the model sees it
    build_page    the Gradio page: upload, caption, chat, the image as the model sees it
    mount_page    the page at ``/`` of the API's app (behind the API key, when one is set)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from medcap.serve._request import APIError, ChatRequest
from medcap.serve._worker import QueueFull

UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]


def _suffix(path: str) -> str:
    s = Path(path).suffix.lower()
    return {".jpeg": ".jpg", ".dicom": ".dcm"}.get(s, s if s in UPLOAD_TYPES else "")


def _read_upload(state, image_path: str) -> bytes:
    if os.path.getsize(image_path) > state.limits.max_body_bytes:
        raise APIError(413, f"the file is over this server's limit of {state.limits.max_body_bytes:,} bytes")
    with open(image_path, "rb") as f:
        return f.read()


def as_seen(state, image_path: str) -> Any:
    """The uploaded file as the model sees it (a PIL image), decoded as a request's
    image is; ``APIError`` when it is not an image the server takes."""
    from medcap.data import resize_center_crop
    from medcap.serve._request import load_image_bytes

    pil = load_image_bytes(_read_upload(state, image_path), _suffix(image_path),
                           max_pixels=state.limits.max_image_pixels)
    return resize_center_crop(pil, state.image_size)


def ask(state, image_path: str, messages: List[Dict[str, str]]) -> Tuple[str, Any]:
    """(answer, image as the model sees it) for ``messages`` about the uploaded file;
    the errors a client can cause come back as ``APIError``."""
    data = _read_upload(state, image_path)
    req = ChatRequest(messages, (data, _suffix(image_path)), None, None, None, None, False, False)
    prepared = state.prepare(req)
    job = prepared.job
    done = threading.Event()
    job.notify = lambda j: done.set() if j.done else None
    try:
        state.worker.submit(job)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}; retry shortly") from None
    if not done.wait(state.limits.request_timeout_s):
        job.cancel()
        state.worker.wake()
        raise APIError(504, "the request took too long")
    if job.error:
        raise APIError(500, job.error)
    return state.text(job.tokens), prepared.seen_image


def _header(model_name: str) -> str:
    named = "" if model_name == "medcap" else f": `{model_name}`"  # not "medcap: medcap"
    return (f"## medcap{named}\nUpload an image (PNG, JPEG or DICOM), caption it, or ask about it; "
            "the chat keeps the conversation until a new image is uploaded.")


def _refusal(message: str):
    """A message box on the page for what the user got wrong; the server's log stays quiet
    (Gradio prints a traceback for every other exception)."""
    import gradio as gr

    return gr.Error(message, print_exception=False)


def build_page(state):
    import gradio as gr

    from medcap.generation import clean_text, question_messages

    def caption(path: Optional[str]):
        if not path:
            raise _refusal("upload an image first")
        try:
            return ask(state, path, question_messages(None))  # (text, image as seen)
        except APIError as e:
            raise _refusal(e.message) from None

    def chat(path: Optional[str], question: str, history: List[Dict[str, str]], convo: List[Dict[str, str]]):
        if not path:
            raise _refusal("upload an image first")
        question = (question or "").strip()
        if not question:
            return "", history, convo, gr.skip()
        turn = [{"role": "user", "content": clean_text(question)}] if convo else question_messages(question)
        try:
            answer, seen = ask(state, path, convo + turn)
        except APIError as e:
            raise _refusal(e.message) from None
        convo = convo + turn + [{"role": "assistant", "content": clean_text(answer)}]
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return "", history, convo, seen

    def new_image(path: Optional[str]):
        seen = None  # a new image starts a new conversation, and shows as the model will see it
        if path:
            try:
                seen = as_seen(state, path)
            except APIError as e:
                gr.Warning(e.message)
        return [], [], seen, ""

    with gr.Blocks(title="medcap", analytics_enabled=False) as page:
        gr.Markdown(_header(state.model_name))
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Image", file_types=UPLOAD_TYPES, type="filepath", elem_id="medcap-image")
                if state.examples:
                    gr.Examples(examples=[[p] for p in state.examples], inputs=[image], label="Demo examples",
                                elem_id="medcap-examples")
                caption_btn = gr.Button("Caption", variant="primary", elem_id="medcap-caption-btn")
                caption_out = gr.Textbox(label="Caption", interactive=False, elem_id="medcap-caption")
                seen = gr.Image(label="As the model sees it", interactive=False, type="pil", elem_id="medcap-seen")
            with gr.Column():
                chatbot = gr.Chatbot(label="Conversation", elem_id="medcap-chat")
                question = gr.Textbox(label="Question", placeholder="Is there a fracture?", elem_id="medcap-question")
                ask_btn = gr.Button("Ask", elem_id="medcap-ask-btn")
        convo = gr.State([])
        caption_btn.click(caption, inputs=[image], outputs=[caption_out, seen])
        for trigger in (ask_btn.click, question.submit):
            trigger(chat, inputs=[image, question, chatbot, convo], outputs=[question, chatbot, convo, seen])
        image.change(new_image, inputs=[image], outputs=[chatbot, convo, seen, caption_out])
    return page


def mount_page(app, state):
    """The page at ``/``; with an API key, the page asks for it (any user name)."""
    import secrets

    import gradio as gr

    auth = None
    if state.api_key:
        key = state.api_key.encode()

        def auth(_user: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), key)

    allowed = sorted({str(Path(p).parent) for p in state.examples})
    return gr.mount_gradio_app(app, build_page(state), path="", auth=auth, allowed_paths=allowed or None,
                               footer_links=[], ssr_mode=False)
