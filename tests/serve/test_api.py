"""The API called by the official ``openai`` client: answers equal the single-shot
command's (``medcap run generate ... image=X prompt=Q``), plain and streamed."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def single_shot(serve_assets):
    """``single_shot(image, question)`` -> the generate recipe's single-shot answer (greedy)."""
    from medcap.config import parse_args

    spec = importlib.util.spec_from_file_location("_serve_test_generate", REPO / "recipes" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cache = {}

    def run(image: Path, question):
        key = (str(image), question)
        if key not in cache:
            args = ["--config", str(REPO / "recipes/configs/tiny/generate.yaml"), *serve_assets["overrides"],
                    f"image={image}"] + ([f"prompt={question}"] if question else [])
            _, cfg = parse_args(args, mod.FREE_TEXT)
            recipe = mod.GenerateRecipe(cfg)
            recipe.setup()
            cache[key] = recipe.single_shot([str(image)], question, recipe.cfg.max_new_tokens)[0]["generated"]
        return cache[key]

    return run


@pytest.fixture
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)


@pytest.mark.parametrize("question", [None, "What is shown?"])
def test_plain_and_streamed_answers_equal_the_single_shot_command(client, serve_assets, single_shot, question,
                                                                  data_url, image_message):
    image = serve_assets["images"][0]
    messages = image_message(data_url(image), question)
    expected = single_shot(image, question)

    plain = client.chat.completions.create(model="medcap", messages=messages, temperature=0)
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1

    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="medcap", messages=messages, temperature=0, stream=True)
              if c.choices]
    assert "".join(pieces) == expected
    assert len([p for p in pieces if p]) >= 2 or len(expected) <= 2  # token by token, not one lump


def test_concurrent_clients_get_their_sequential_answers(client, serve_assets, data_url, image_message):
    """Requests that share the batch answer exactly as when sent one at a time."""
    images = serve_assets["images"]
    asks = [(images[i % len(images)], q) for i in range(8) for q in [None if i % 2 else f"Question {i}?"]]

    def ask(item):
        img, q = item
        r = client.chat.completions.create(model="medcap", messages=image_message(data_url(img), q), max_tokens=12)
        return r.choices[0].message.content

    sequential = [ask(a) for a in asks]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, asks))
    assert together == sequential
    assert len(set(sequential)) > 1  # different images and questions do give different answers


def test_models_health_and_the_defaults(client, served):
    import httpx

    server, state = served
    assert [m.id for m in client.models.list().data] == ["medcap"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["slots"] == 4  # tiny/generate's batch_size
    # a request without max_tokens gets the config's max_new_tokens (16) at most
    r = client.chat.completions.create(model="medcap", messages=[{"role": "user", "content": "hello"}])
    assert r.usage.completion_tokens <= 16


def test_seeded_sampling_repeats_and_top_k_is_an_extra_field(client, serve_assets, data_url, image_message):
    messages = image_message(data_url(serve_assets["images"][1]), "Describe it.")

    def sample(seed):
        return client.chat.completions.create(model="medcap", messages=messages, temperature=1.5, seed=seed,
                                              max_tokens=20, extra_body={"top_k": 50}).choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1  # sampling really samples
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(model="medcap", messages=messages, extra_body={"top_k": 0})


def test_a_multi_turn_conversation(client, serve_assets, data_url, image_message):
    url = data_url(serve_assets["images"][0])
    first = client.chat.completions.create(model="medcap", messages=image_message(url, "What is it?"), max_tokens=8)
    messages = image_message(url, "What is it?") + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Where?"},
    ]
    second = client.chat.completions.create(model="medcap", messages=messages, max_tokens=8)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("kind", ["jpeg", "dicom"])
def test_jpeg_and_dicom_images_answer_as_the_single_shot_command(client, serve_assets, single_shot, data_url,
                                                                 image_message, tmp_path, kind):
    from PIL import Image

    if kind == "jpeg":
        path = tmp_path / "scan.jpg"
        Image.open(serve_assets["images"][1]).convert("RGB").save(path, quality=90)
        mime = "image/jpeg"
    else:
        from pydicom.data import get_testdata_file

        path, mime = Path(get_testdata_file("CT_small.dcm")), "application/dicom"  # a real CT slice, 16-bit
    r = client.chat.completions.create(model="medcap", messages=image_message(data_url(path, mime), "Where?"),
                                       temperature=0)
    assert r.choices[0].message.content == single_shot(path, "Where?")
    assert r.usage.completion_tokens >= 1
