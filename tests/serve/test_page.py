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
