"""The web page (Gradio, mounted at ``/`` on the API's server).

Upload an image (PNG, JPEG or DICOM) or pick a demo example, press Caption, ask
questions in a chat that keeps the conversation, and see the image as the model
sees it (after resize and centre crop). The page calls the same code as the API
(``ServeState.prepare`` and the batching worker), with the file's bytes as they
were uploaded, so its answer for an image equals the API's for the same bytes.
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


def ask(state, image_path: str, messages: List[Dict[str, str]]) -> Tuple[str, Any]:
    """(answer, image as the model sees it) for ``messages`` about the uploaded file;
    the errors a client can cause come back as ``APIError``."""
    if os.path.getsize(image_path) > state.limits.max_body_bytes:
        raise APIError(413, f"the file is over this server's limit of {state.limits.max_body_bytes:,} bytes")
    with open(image_path, "rb") as f:
        data = f.read()
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


def build_page(state):
    import gradio as gr

    from medcap.generation import clean_text
    from medcap.generation import question_messages

    def caption(path: Optional[str]):
        if not path:
            raise gr.Error("upload an image first")
        try:
            text, seen = ask(state, path, question_messages(None))
        except APIError as e:
            raise gr.Error(e.message) from None
        return text, seen

    def chat(path: Optional[str], question: str, history: List[Dict[str, str]], convo: List[Dict[str, str]]):
        if not path:
            raise gr.Error("upload an image first")
        question = (question or "").strip()
        if not question:
            return "", history, convo, gr.skip()
        turn = [{"role": "user", "content": clean_text(question)}] if convo else question_messages(question)
        try:
            answer, seen = ask(state, path, convo + turn)
        except APIError as e:
            raise gr.Error(e.message) from None
        convo = convo + turn + [{"role": "assistant", "content": clean_text(answer)}]
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return "", history, convo, seen

    def new_image(_path):
        return [], [], None, ""  # a new image starts a new conversation

    with gr.Blocks(title="medcap", analytics_enabled=False) as page:
        gr.Markdown(f"## medcap: `{state.model_name}`\nUpload an image (PNG, JPEG or DICOM), caption it, "
                    "or ask about it; the chat keeps the conversation until a new image is uploaded.")
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Image", file_types=UPLOAD_TYPES, type="filepath", elem_id="medcap-image")
                if state.examples:
                    gr.Examples(examples=[[p] for p in state.examples], inputs=[image], label="Demo examples")
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
