"""The explorer page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver` packages, which scripts/bootstrap.sh installs) driven by Selenium, against
`mlsae serve`'s app on a real port over the embedded-model warehouse of
tests/serve_warehouse.py. Screenshots go to the test's tmp dir."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.parse

import pytest

from tests.serve_warehouse import SAE_ID, build_serve_warehouse

PROMPT = "When John and Mary went to the store, John gave a drink to"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium + chromium-driver: run scripts/bootstrap.sh as root "
           "(or apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from mlsae.serve.app import create_app

    app = create_app(build_serve_warehouse(tmp_path_factory), device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the explorer did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_ready(driver, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.ready || null"))
    return driver.execute_script("return document.body.dataset.ready")


def _no_console_errors(driver):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # a CSP violation or a script error would show here


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_home_prompt_latent_context(server, browser, tmp_path):
    base, app = server
    handle = app.state.explorer.loader.get(app.state.explorer.catalog.sae(SAE_ID))
    n_tokens = len(handle.loaded.tokenizer(PROMPT)["input_ids"])

    # home: the SAE, its metrics plot, the variance summary
    browser.get(base + "/")
    assert _wait_ready(browser) == "1"
    browser.save_screenshot(str(tmp_path / "home.png"))
    assert len(_css(browser, "#sae-table tr[data-sae]")) == 2  # plain + tuned-lens SAE
    assert len(_css(browser, "#metrics-charts svg")) == 5
    assert len(_css(browser, "#variance-table tr")) > 5
    _no_console_errors(browser)

    # submit the John-and-Mary prompt from the home page's form
    box = _css(browser, "#prompt-text")[0]
    box.clear()
    box.send_keys(PROMPT)
    _css(browser, "#prompt-submit")[0].click()
    assert _wait_ready(browser) == "1", _css(browser, "#error")[0].text
    assert urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query)["text"] == [
        PROMPT]  # the URL holds the prompt
    browser.save_screenshot(str(tmp_path / "prompt.png"))
    tokens = _css(browser, "#tokens .tok")
    assert len(tokens) == n_tokens
    coloured = [t for t in tokens if float(t.get_attribute("data-value")) > 0]
    assert coloured and all(t.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
                            for t in coloured)
    heat = _css(browser, "#heatmap-svg")[0]
    n_layers, n_latents = int(heat.get_attribute("data-layers")), int(
        heat.get_attribute("data-latents"))
    assert n_layers == 6 and n_latents > 0
    assert len(_css(browser, "#heatmap-svg rect.cell")) == n_layers * n_latents
    assert len(_css(browser, "#heatmap-svg .heat-label")) == n_latents
    assert len(_css(browser, "#top-table tr")) > 1
    assert len(_css(browser, "#logits table.pred")) == 2  # clean, reconstructed
    _no_console_errors(browser)

    # steer from the form: a third predictions table
    factor = _css(browser, "#steer-form input[name=factor]")[0]
    factor.clear()
    factor.send_keys("20")
    _css(browser, "#steer-submit")[0].click()
    assert _wait_ready(browser) == "1"
    assert len(_css(browser, "#logits table.pred")) == 3

    # open a latent from the heatmap
    label = _css(browser, "#heatmap-svg .heat-label")[0]
    latent = label.get_attribute("data-latent")
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                           label)
    assert _wait_ready(browser) == "1", _css(browser, "#error")[0].text
    assert f"Latent {latent}" in _css(browser, "h1")[0].text
    browser.save_screenshot(str(tmp_path / "latent.png"))
    assert len(_css(browser, "svg.dist rect.bar")) == 6
    contexts = _css(browser, "#contexts .context")
    assert contexts and len(_css(browser, "#contexts .context mark")) == len(contexts)
    _no_console_errors(browser)

    # open a context as a prompt
    context_text = contexts[0].find_element("css selector", "mark").text
    contexts[0].click()
    assert _wait_ready(browser) == "1", _css(browser, "#error")[0].text
    browser.save_screenshot(str(tmp_path / "context.png"))
    assert "/prompt" in browser.current_url
    assert context_text.strip() in browser.find_element("id", "tokens").text
    assert len(_css(browser, "#tokens .tok.current")) == 1
    for name in ("home", "prompt", "latent", "context"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_bad_input_shows_a_message_not_a_crash(server, browser, tmp_path):
    base, _ = server
    browser.get(base + "/prompt?" + urllib.parse.urlencode({"sae": SAE_ID, "text": "x" * 5000}))
    assert _wait_ready(browser) == "error"
    assert "limit is 4000" in _css(browser, "#error")[0].text
    browser.get(base + "/latent?sae=no-such-sae&latent=1")
    assert _wait_ready(browser) == "error"
    assert "unknown sae_id" in _css(browser, "#error")[0].text
    attack = "<img src=x onerror=alert(1)>"
    browser.get(base + "/prompt?" + urllib.parse.urlencode({"sae": SAE_ID, "text": attack}))
    assert _wait_ready(browser) == "1"
    assert not _css(browser, "#tokens img")  # shown as text, never parsed as HTML
    browser.save_screenshot(str(tmp_path / "injection.png"))
