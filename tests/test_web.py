"""The chat page at ``GET /``, driven in a real headless browser (Debian's chromium + chromedriver, Selenium).

The server runs for real (uvicorn on loopback, a tiny random Llama over the SmolLM2 tokenizer, 4 sinks + a
64-token window). What the page shows is checked against an independent expectation: the same conversation
run in-process with :class:`StreamingSession` (replies and counters). Nothing is downloaded: without the
browser, its driver or selenium the browser tests are skipped with a reason that says they were NOT run.

``STREAMING_LLM_SAVE_SCREENSHOT=1`` writes the screenshots to ``results/web/`` (else to a temporary folder).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, tiny_llama
from test_server import GREEDY, KEY, SYSTEM, WINDOW, Served

MAX_TOKENS = 24  # per reply in the browser conversation
TURNS = [f"Turn {i}: tell me about item number {i}." for i in range(5)]
SAVE = os.environ.get("STREAMING_LLM_SAVE_SCREENSHOT") == "1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama over the SmolLM2 vocabulary (and its chat template), saved as a model directory."""
    path = tmp_path_factory.mktemp("web-model")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def page_server(model_dir):
    server = Served(model_dir, *GREEDY, "--api-key", KEY, "--start-size", "4", "--recent-size", str(WINDOW))
    yield server
    server.stop()


# -- without a browser: routes, Guard rules, the --no-web flag ----------------------------------------------
def test_page_needs_no_key_but_obeys_host_and_origin(page_server):
    url = page_server.url
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]  # same-origin only, no CDN
    for path in ("/web/app.js", "/web/style.css"):
        assert path in page.text
        asset = httpx.get(url + path, timeout=30)
        shipped = (REPO / "streaming_llm/serving/web" / path.split("/")[-1]).read_bytes()
        assert asset.status_code == 200 and asset.content == shipped
    assert "javascript" in httpx.get(url + "/web/app.js", timeout=30).headers["content-type"]
    assert httpx.get(url + "/web/missing.js", timeout=30).status_code == 404
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401  # the API still needs the key
    foreign = httpx.get(url + "/", headers={"Origin": "http://evil.example"}, timeout=30)
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "origin_not_allowed"
    rebound = httpx.get(url + "/", headers={"Host": "attacker.example"}, timeout=30)
    assert rebound.status_code in (400, 421) and rebound.json()["error"]["code"] == "host_not_allowed"
    # The page's own POSTs carry Origin = the server itself: accepted (with the key), not with a wrong one.
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    own = {"Origin": url, "Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=own, timeout=30).status_code == 200
    wrong = {**own, "Authorization": "Bearer nope"}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=wrong, timeout=30).status_code == 401
    # The same name on another port is another origin.
    other = {**own, "Origin": f"http://127.0.0.1:{page_server.port + 1}"}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=other, timeout=30).status_code == 403


def test_no_web_turns_the_page_off(monkeypatch, model, tokenizer):
    import uvicorn
    from fastapi.testclient import TestClient

    from streaming_llm.cli import build_parser
    from streaming_llm.serving.server import serve

    parser = build_parser()
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: apps.append(self.config.app))
    for flags in ([], ["--no-web"]):
        serve(parser.parse_args(["serve", "--recent-size", "16", *flags]), model, tokenizer)
    statuses = []
    for app in apps:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            statuses.append((client.get("/").status_code, client.get("/web/app.js").status_code))
            assert client.get("/health").status_code == 200
    assert statuses == [(200, 200), (404, 404)]


# -- in the browser -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.skip(f"browser test NOT run: {', '.join(missing)} missing (apt-get install chromium chromium-driver; "
                    "pip install selenium)")  # fmt: skip
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--lang=en-US",
                 "--window-size=1280,960", "--force-device-scale-factor=1", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})  # fmt: skip
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))  # a path given: no Selenium Manager
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def _focus_by_tab(driver, selector: str) -> None:
    """Reach ``selector`` with the Tab key alone (proves it is in the keyboard order)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(60):
        if _js(driver, "return document.activeElement.matches(arguments[0])", selector):
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"{selector} is not reachable with Tab")


def _keys(driver, *keys) -> None:
    """Type into whatever has the focus (modifiers stay down until ``Keys.NULL``, as in ``send_keys``)."""
    driver.switch_to.active_element.send_keys(*keys)


def _counters(driver) -> dict[str, str]:
    ids = ("seen", "evicted", "cached", "mib", "turns", "rate")
    script = "return Object.fromEntries(arguments[0].map(i => [i, document.getElementById(i).dataset.value]))"
    return _js(driver, script, list(ids))


def _notice(driver) -> str:
    return _js(driver, "const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent")


def _idle(driver) -> bool:
    return _js(driver, "return !document.getElementById('send').disabled")


def _reference(model_dir: Path, turns: list[str]):
    """The conversation run in-process: each reply and the session's stats after it."""
    from streaming_llm import StreamingSession, load_model

    model, tokenizer = load_model(str(model_dir), device="cpu", dtype="float32")
    session = StreamingSession(model, tokenizer, SYSTEM, start_size=4, recent_size=WINDOW)
    replies, stats = [], []
    for turn in turns:
        replies.append(session.chat(turn, max_new_tokens=MAX_TOKENS))
        stats.append(session.stats())
    return replies, stats


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    folder = REPO / "results" / "web" if SAVE else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


PIECES = """
window.__pieces = [];
new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes)
  if (n.nodeType === 3 && r.target.closest && r.target.closest('.msg.assistant')) window.__pieces.push(n.data.length);
}).observe(document.getElementById('transcript'), {subtree: true, childList: true});
"""


def test_chat_in_a_real_browser(browser, page_server, model_dir, tmp_path):
    from selenium.webdriver.common.keys import Keys

    driver, url = browser, page_server.url
    driver.get(url + "/")
    # A server with a key: the page asks for it; a wrong one gets a clear message.
    _wait(lambda: "needs an API key" in _notice(driver), "the key prompt")
    assert _js(driver, "return document.activeElement.id") == "api-key"
    _keys(driver, "not-the-key", Keys.ENTER)
    _wait(lambda: "Wrong API key" in _notice(driver), "the wrong-key message")
    assert "401" in _notice(driver)
    assert _js(driver, "return document.getElementById('notice').getAttribute('role')") == "alert"  # announced
    _keys(driver, Keys.CONTROL, "a", Keys.NULL, KEY, Keys.ENTER)
    _wait(lambda: _js(driver, "return document.getElementById('key-box').hidden") and not _notice(driver), "the key")
    assert _js(driver, "return document.getElementById('model-name').textContent") == "streaming-llm"
    session_id = _js(driver, "return document.getElementById('session-id').textContent")
    assert session_id.startswith("web-")

    # Settings with the keyboard: system prompt, reply length.
    _focus_by_tab(driver, "details.settings summary")
    _keys(driver, Keys.ENTER)
    _focus_by_tab(driver, "#system-prompt")
    _keys(driver, SYSTEM)
    _focus_by_tab(driver, "#max-tokens")
    _keys(driver, Keys.CONTROL, "a", Keys.NULL, str(MAX_TOKENS))

    # Shift+Enter adds a line and sends nothing.
    prompt = driver.find_element("id", "prompt")
    prompt.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second")
    assert prompt.get_attribute("value") == "first line\nsecond"
    assert _js(driver, "return document.querySelectorAll('.msg').length") == 0
    prompt.send_keys(Keys.CONTROL, "a", Keys.NULL, Keys.DELETE)

    # Five turns, each typed and sent with Enter; the page against the in-process reference.
    expected, expected_stats = _reference(model_dir, TURNS)
    # The server's row holds a pinned area of --pinned-capacity (default 256) for system prompts: its bytes, not the
    # in-process session's (which pins just its prompt), are what the page shows.
    from transformers import AutoConfig

    from streaming_llm.serving.replicas import session_bytes

    row_bytes = session_bytes(AutoConfig.from_pretrained(model_dir), 4, WINDOW, "float32", pinned_capacity=256)
    _js(driver, PIECES)
    seen = []
    for i, turn in enumerate(TURNS):
        _js(driver, "window.__pieces = []")
        prompt.send_keys(turn, Keys.ENTER)
        _wait(lambda n=i + 1: _idle(driver) and _counters(driver)["turns"] == str(n), f"turn {i + 1}")
        replies = _js(driver, "return [...document.querySelectorAll('.msg.assistant .text')].map(e => e.textContent)")
        assert replies == expected[: i + 1]  # only the new message was sent each turn, the stream fully rendered
        pieces = _js(driver, "return window.__pieces")
        assert len(pieces) > 1 and pieces == sorted(set(pieces)) and pieces[-1] == len(expected[i])  # piece by piece
        shown, want = _counters(driver), expected_stats[i]
        assert [int(shown[k]) for k in ("seen", "evicted", "cached", "mib", "turns")] == [
            want.seen_tokens, want.evicted_tokens, want.cached_tokens, row_bytes, want.turns]  # fmt: skip
        assert float(shown["rate"]) > 0
        mib_text = _js(driver, "return document.getElementById('mib').textContent")
        assert float(mib_text) == pytest.approx(row_bytes / 2**20, rel=1e-2)
        seen.append(want)
    assert seen[-1].evicted_tokens > WINDOW and seen[-1].evicted_tokens > seen[1].evicted_tokens > 0
    assert len({s.cache_bytes for s in seen}) == 1  # memory flat while evictions grow
    mib_line = _js(driver, "return document.querySelector('#spark-mib polyline').getAttribute('points')").split()
    evicted_line = _js(driver, "return document.querySelector('#spark-evicted polyline').getAttribute('points')")
    assert len(mib_line) == len(TURNS) and len({p.split(",")[1] for p in mib_line}) == 1  # a flat line
    heights = [float(p.split(",")[1]) for p in evicted_line.split()]
    assert heights[-1] < heights[1]  # climbing (SVG y grows downwards)
    # The session list holds this conversation, marked as the current one.
    listed = "return document.querySelector(`#sessions [data-id='${arguments[0]}']`)?.getAttribute('aria-current')"
    _wait(lambda: _js(driver, listed, session_id) == "true", "the session in the list")
    _js(driver, "document.querySelector('details.settings').open = false")  # the memory panel in view
    _js(driver, "document.querySelector('.panel').scrollTop = 0")
    _screenshot(driver, tmp_path, "chat.png")

    # A long reply streams into the page while it runs, and Esc stops it; the server keeps the turn.
    _js(driver, "document.getElementById('max-tokens').value = '4000'")
    prompt.send_keys("Now go on and on.", Keys.ENTER)
    running = "return document.querySelector('.msg.assistant:last-of-type .text').textContent.length > 0 && " \
              "!document.getElementById('stop').disabled"  # fmt: skip
    _wait(lambda: _js(driver, running), "text while the reply runs")
    _keys(driver, Keys.ESCAPE)
    _wait(lambda: _idle(driver) and _counters(driver)["turns"] == str(len(TURNS) + 1), "the stopped turn")
    assert "Stopped" in _notice(driver)
    assert _js(driver, "return document.querySelector('.msg.assistant:last-of-type').classList.contains('stopped')")
    server_side = page_server.get(f"/v1/sessions/{session_id}").json()
    assert server_side["turns"] == len(TURNS) + 1 and server_side["seen_tokens"] < seen[-1].seen_tokens + 4000
    assert int(_counters(driver)["seen"]) == server_side["seen_tokens"]

    # New conversation (keyboard only) resets everything shown.
    _focus_by_tab(driver, "#new-chat")
    _keys(driver, Keys.ENTER)
    _wait(lambda: _js(driver, "return document.getElementById('session-id').textContent") != session_id, "a new id")
    assert _counters(driver) == {"seen": "0", "evicted": "0", "cached": "0", "mib": "0", "turns": "0", "rate": ""}
    assert _js(driver, "return document.querySelectorAll('.msg').length") == 0
    assert _js(driver, "return document.querySelector('#spark-mib polyline').getAttribute('points')") == ""

    # Reopen the first conversation from the list (keyboard): its counters and transcript come back.
    _wait(lambda: _js(driver, "return !!document.querySelector(`#sessions [data-id='${arguments[0]}']`)", session_id),
          "the list")  # fmt: skip
    _focus_by_tab(driver, f"#sessions [data-id='{session_id}']")
    _keys(driver, Keys.ENTER)
    _wait(lambda: _counters(driver)["turns"] == str(len(TURNS) + 1), "the reopened session")
    assert int(_counters(driver)["seen"]) == server_side["seen_tokens"]
    assert _js(driver, "return document.querySelectorAll('.msg').length") == 2 * (len(TURNS) + 1)

    # Download the session file: the export endpoint where the server has it, else a clear message.
    export = page_server.get(f"/v1/sessions/{session_id}/export")
    _focus_by_tab(driver, "#download")
    _keys(driver, Keys.ENTER)
    if export.status_code == 200:
        files = _wait(lambda: [p for p in driver.downloads.iterdir() if not p.name.endswith(".crdownload")], "a file")
        assert files[0].read_bytes() == export.content
    else:
        assert export.status_code == 404
        _wait(lambda: "cannot export" in _notice(driver), "the no-export message")
        assert _js(driver, "return document.getElementById('download').hidden")

    logged = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert [m for m in logged if "Failed to load" not in m] == []  # no script errors (a 401/404 is 'Failed to load')


CONTRAST = """
function rgb(c) { const m = c.match(/[\\d.]+/g).map(Number); return m.length > 3 ? m : [...m, 1]; }
function lum([r, g, b]) {
  const linear = v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
  return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
}
function background(e) {
  for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c[3] > 0.5) return c; }
  return [255, 255, 255, 1];
}
const worst = [];
for (const e of document.querySelectorAll('body *')) {
  const own = [...e.childNodes].some(n => n.nodeType === 3 && n.data.trim());
  const box = e.getBoundingClientRect();
  if (!own || !box.width || e.closest('[hidden]') || e.closest(':disabled') || e.closest('svg')) continue;
  const [a, b] = [lum(rgb(getComputedStyle(e).color)), lum(background(e))];
  worst.push([(Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05), e.tagName + '#' + e.id + '.' + e.className]);
}
worst.sort((x, y) => x[0] - y[0]);
return worst.slice(0, 3);
"""


LAYOUT = """const r = s => document.querySelector(s).getBoundingClientRect();
return {chat: r('.chat'), panel: r('.panel'), prompt: r('#prompt'), send: r('#send'), width: innerWidth}"""


def test_page_on_a_narrow_screen_readable_in_both_schemes(browser, page_server, tmp_path):
    driver = browser
    driver.get(page_server.url + "/")
    _js(driver, "sessionStorage.setItem('streaming-llm:api-key', arguments[0]); location.reload()", KEY)
    _wait(lambda: _js(driver, "return document.getElementById('model-name').textContent") == "streaming-llm", "load")
    try:
        for scheme in ("light", "dark"):
            driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                                 "value": scheme}]})  # fmt: skip
            worst = _js(driver, CONTRAST)
            assert worst and worst[0][0] >= 4.5, (scheme, worst)  # WCAG AA for text
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                             "value": "light"}]})  # fmt: skip
        driver.set_window_size(390, 860)  # a phone
        _wait(lambda: _js(driver, "return window.innerWidth") <= 400, "the narrow window")
        assert _js(driver, "return document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        layout = _js(driver, LAYOUT)
        assert layout["panel"]["top"] >= layout["chat"]["bottom"]  # one column, the chat first
        for name in ("prompt", "send"):
            box = layout[name]
            assert box["left"] >= 0 and box["right"] <= layout["width"] and box["width"] > 40  # all there
        _screenshot(driver, tmp_path, "chat-narrow.png")
    finally:
        driver.set_window_size(1280, 960)
