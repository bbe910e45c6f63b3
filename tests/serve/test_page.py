"""The web page in headless Chromium (Debian's chromium + chromedriver, through selenium):
upload an image, press Caption, read the caption, which equals the API's answer; then
a two-turn chat about the same image."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = "/usr/bin/chromedriver"
MISSING = ("Chromium is not installed: `make test` installs it when run as root (scripts/ensure_chromium.sh); "
           "otherwise: sudo apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMEDRIVER, os.X_OK) and (shutil.which("chromium") or shutil.which("chromium-browser"))):
        pytest.skip(MISSING)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _api(server, image, question=None):
    import base64

    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()}}]
    if question:
        parts.append({"type": "text", "text": question})
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}, timeout=60)
    return r.json()["choices"][0]["message"]["content"]


def test_the_page_captions_an_uploaded_image_as_the_api_does(served, serve_assets, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = served
    image = serve_assets["images"][2]
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#medcap-image input[type=file]"))
    upload.send_keys(str(image))
    wait.until(lambda d: image.stem in d.find_element(By.ID, "medcap-image").text)  # uploaded

    browser.find_element(By.ID, "medcap-caption-btn").click()
    box = browser.find_element(By.CSS_SELECTOR, "#medcap-caption textarea")
    caption = wait.until(lambda d: box.get_attribute("value"))
    assert caption == _api(server, image)
    # the image as the model sees it: the tiny tower's 32 x 32 crop
    seen = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#medcap-seen img"))
    assert wait.until(lambda d: seen.get_property("naturalWidth")) == 32

    question = browser.find_element(By.CSS_SELECTOR, "#medcap-question textarea")
    for i, q in enumerate(["What is shown?", "Where?"]):
        question.send_keys(q)
        browser.find_element(By.ID, "medcap-ask-btn").click()
        replies = wait.until(lambda d: (lambda b: b if len(b) == i + 1 else None)(
            d.find_elements(By.CSS_SELECTOR, "#medcap-chat [data-testid=bot] .message-content")))
        if i == 0:  # the first turn is the API's single question about the image
            assert " ".join(replies[0].text.split()) == " ".join(_api(server, image, q).split())
    users = browser.find_elements(By.CSS_SELECTOR, "#medcap-chat [data-testid=user] .message-content")
    assert [u.text.strip() for u in users] == ["What is shown?", "Where?"]


# ---- the demo's examples, the header, a Caption without an image


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory):
    """A demo folder as `medcap demo` lays out its world (three held-out images), moved
    away from where it was written: the examples must be found through the records'
    relative `meta dir=`, as the data loader finds them."""
    from medcap.demo._settings import DemoSettings
    from medcap.demo._world import write_world

    root = tmp_path_factory.mktemp("demo_layout")
    write_world(root / "written" / "world", DemoSettings(n_train=1, n_test=3, image_size=40))
    (root / "written").rename(root / "moved")
    return root / "moved"


def test_demo_examples_are_the_test_images_where_the_loader_finds_them(demo_layout, monkeypatch, tmp_path):
    from medcap.serve._main import demo_examples

    monkeypatch.chdir(tmp_path)  # not the demo folder: paths must not lean on the working folder
    found = demo_examples(str(demo_layout), n=2)
    # the demo's layout, written out by hand: world/OmniMedVQA/Images/MedcapDemo/test_0000i.png
    expected = [demo_layout / "world" / "OmniMedVQA" / "Images" / "MedcapDemo" / f"test_{i:05d}.png" for i in (0, 1)]
    assert found == [str(p.resolve()) for p in expected]


def test_a_missing_demo_example_is_said_not_swallowed(demo_layout, tmp_path, caplog):
    import logging
    import shutil as sh

    from medcap.serve._main import demo_examples

    copy = tmp_path / "demo"
    sh.copytree(demo_layout, copy)
    gone = copy / "world" / "OmniMedVQA" / "Images" / "MedcapDemo" / "test_00001.png"
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="medcap.serve"):
        found = demo_examples(str(copy))
    assert [os.path.basename(p) for p in found] == ["test_00000.png", "test_00002.png"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "test.json item 1" in said[0] and str(gone) in said[0], said

    caplog.clear()
    (copy / "world" / "test.json").unlink()
    with caplog.at_level(logging.WARNING, logger="medcap.serve"):
        assert demo_examples(str(copy)) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"no demo examples on the page: dataset file not found: {str(copy / 'world' / 'test.json')!r}"]


@pytest.fixture(scope="module")
def demo_served(start_server, demo_layout):
    """The tiny model served with the page listing the demo layout's examples."""
    from medcap.serve._main import demo_examples

    examples = demo_examples(str(demo_layout))
    assert len(examples) == 3
    with start_server(page=True, examples=examples) as pair:
        yield pair


def test_the_page_lists_the_demo_examples_and_captions_one(demo_served, browser):
    from pathlib import Path

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, state = demo_served
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    examples = wait.until(lambda d: d.find_element(By.ID, "medcap-examples"))
    assert "Demo examples" in examples.text
    names = [Path(p).name for p in state.examples]
    assert all(n in examples.text for n in names), examples.text
    header = browser.find_element(By.CSS_SELECTOR, "h2").text
    assert header == "medcap"  # the model's name is the default: said once, not "medcap: medcap"

    examples.find_element(By.XPATH, f".//button[contains(., '{names[1]}')]").click()
    wait.until(lambda d: Path(names[1]).stem in d.find_element(By.ID, "medcap-image").text)  # loaded
    # shown as the model sees it on upload, before any Caption: the tiny tower's 32 x 32 crop
    seen = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#medcap-seen img"))
    assert wait.until(lambda d: seen.get_property("naturalWidth")) == 32
    assert browser.find_element(By.CSS_SELECTOR, "#medcap-caption textarea").get_attribute("value") == ""

    browser.find_element(By.ID, "medcap-caption-btn").click()
    box = browser.find_element(By.CSS_SELECTOR, "#medcap-caption textarea")
    caption = wait.until(lambda d: box.get_attribute("value"))
    assert caption == _api(server, Path(state.examples[1]))


def test_caption_without_an_image_is_a_message_not_a_traceback(demo_served, browser, capfd):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = demo_served
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "medcap-caption-btn")).click()
    wait.until(lambda d: "upload an image first" in d.find_element(By.TAG_NAME, "body").text)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "upload an image first" not in out + err
