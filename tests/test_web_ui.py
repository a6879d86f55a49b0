"""The web UI at `/`, driven in Debian's headless Chromium by Playwright against a live server.

One server (tiny random Llama, a LoRA adapter, an API key) serves every test; each test opens a
fresh browser context. Screenshots go to a temporary directory; SARATHI_UI_SCREENSHOTS=docs/images
regenerates the ones in the docs."""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from lora_testutil import make_adapter
from server_harness import metric, running_server

CHROMIUM = os.environ.get("SARATHI_CHROMIUM", "/usr/bin/chromium")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (make setup installs Debian's chromium; Playwright cannot "
                f"download its own browser here)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402 - after the skip

KEY = "ui-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGES = Path(os.environ.get("SARATHI_UI_SCREENSHOTS") or tempfile.mkdtemp(prefix="sarathi-ui-"))
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PAYLOAD = ('<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> '
           '[click](javascript:window.__pwned=3) **bold**')


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ui-adapter") / "a1", seed=1, r=4)
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--kv-cache-memory", "64MiB",
            "--max-model-len", "2048", "--quantization", "none", "--enable-lora", "--max-loras", "2",
            "--max-lora-rank", "8", "--lora-modules", f"a1={adapter}", "--api-key", KEY]
    with running_server(args, tmp_path_factory.mktemp("ui-server") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Page):
        self.errors = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


def open_ui(browser, server, viewport=DESKTOP, key=True, path="/"):
    """A new context (fresh storage) on the UI; with key, the API key is already in sessionStorage."""
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    if key:
        context.add_init_script(f"sessionStorage.setItem('sarathi.apiKey', {json.dumps(KEY)})")
    page = context.new_page()
    console = Console(page)
    page.goto(server.base_url + path)
    return page, console


@pytest.fixture
def ui(browser, server):
    """A page with the key; fails the test on any console error."""
    page, console = open_ui(browser, server)
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    yield page
    page.context.close()
    assert console.errors == []


def set_field(page, field, value):
    page.fill(f"#{field}", str(value))
    page.dispatch_event(f"#{field}", "change")


def conversations(page):
    return page.evaluate("JSON.parse(localStorage.getItem('sarathi.conversations'))")


def metrics(server):
    return httpx.get(server.base_url + "/metrics", timeout=10).text


def send(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_output(page):
    return page.locator("#messages article.msg").last


def wait_finished(page, timeout=60_000):
    """The last message once the stream has closed: the page renders a finish reason as soon as the
    last chunk arrives but saves the conversation only after the stream ends, so wait for both."""
    expect(last_output(page)).not_to_have_attribute("data-finish", "streaming", timeout=timeout)
    page.wait_for_function("""() => {
        const convs = JSON.parse(localStorage.getItem('sarathi.conversations') || '[]');
        const msgs = convs.length ? convs[0].messages : [];
        return msgs.length && msgs[msgs.length - 1].finish !== 'streaming';
    }""", timeout=timeout)
    return conversations(page)[0]["messages"][-1]


def test_page_and_static_files_are_open_but_stats_need_the_key(server):
    page = httpx.get(server.base_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert httpx.get(server.base_url + "/ui/static/app.js").status_code == 200
    assert httpx.get(server.base_url + "/ui/static/../api_server.py").status_code in (401, 404)
    assert httpx.get(server.base_url + "/ui/static/nope.js").status_code == 401   # not a UI file: the API's rules
    assert httpx.get(server.base_url + "/ui/stats").status_code == 401
    assert httpx.get(server.base_url + "/ui/vocab").status_code == 401
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    stats = httpx.get(server.base_url + "/ui/stats", headers=AUTH).json()
    assert stats["engine"]["kv_slots"] == [] and isinstance(stats["engine"]["steps"], list)


def test_the_browser_enforces_the_csp(browser, server):
    """Neither another origin nor inline script: what a successful injection would try."""
    page, console = open_ui(browser, server)
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    blocked = page.evaluate("""async () => {
        const seen = [];
        document.addEventListener('securitypolicyviolation', (e) => seen.push(e.effectiveDirective));
        let fetched = true;
        try { await fetch('http://127.0.0.2:9/'); } catch { fetched = false; }
        document.body.insertAdjacentHTML('beforeend', '<img src="/ui/static/favicon.svg" onload="window.__ran = 1">');
        const s = document.createElement('script');
        s.textContent = 'window.__ran = 2';
        document.body.append(s);
        await new Promise((r) => setTimeout(r, 300));
        return { fetched, ran: window.__ran ?? null, seen };
    }""")
    assert blocked["fetched"] is False and blocked["ran"] is None
    assert {"connect-src", "script-src-attr", "script-src-elem"} <= set(blocked["seen"]), blocked
    assert all("Content Security Policy" in e for e in console.errors), console.errors
    page.context.close()


def test_disable_ui_and_stats_while_loading():
    from fastapi.testclient import TestClient

    from sarathi.entrypoints.openai.api_server import build_app, make_arg_parser

    # no lifespan here: the engine never loads, as in the seconds after start
    args = make_arg_parser().parse_args(["--model", "unused"])
    app = build_app(args, engine_factory=lambda: None)
    client = TestClient(app)
    r = client.get("/ui/stats")
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    assert "sarathi:request_rejected_total{" not in app.state.metrics.render().decode(), "UI polls are not rejections"
    assert client.get("/").status_code == 200

    args = make_arg_parser().parse_args(["--model", "unused", "--disable-ui"])
    client = TestClient(build_app(args, engine_factory=lambda: None))
    for path in ("/", "/ui/stats", "/ui/vocab", "/ui/static/app.js"):
        assert client.get(path).status_code == 404, path


def test_without_the_key_nothing_loads_until_it_is_given(browser, server):
    page, console = open_ui(browser, server, key=False)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.wait_for_timeout(1500)   # a poll or two would have come and gone
    assert page.locator("#model option").count() == 0
    assert page.text_content("#status-running") == "–"
    assert all("401" in e for e in console.errors), console.errors   # only the refused requests
    page.fill("#key-input", "wrong-key")
    page.press("#key-input", "Enter")
    expect(page.locator("#key-error")).to_have_text("The server refused this key.")
    assert page.locator("#model option").count() == 0
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    expect(page.locator("#status-running")).to_have_text("0")
    assert page.evaluate("sessionStorage.getItem('sarathi.apiKey')") == KEY
    assert page.evaluate("localStorage.getItem('sarathi.apiKey')") is None
    page.context.close()


def test_chat_streams_the_servers_answer_with_token_details(ui, server):
    set_field(ui, "temperature", 0)
    set_field(ui, "max_tokens", 200)
    send(ui, "Hello there")
    # the text appears while the request is still streaming
    partial = ui.wait_for_function("""() => {
        const a = [...document.querySelectorAll('#messages article.msg')].pop();
        const n = a.dataset.finish === 'streaming' ? a.querySelector('.body').textContent.length : 0;
        return n > 0 && n; }""").json_value()
    msg = wait_finished(ui)
    assert msg["finish"] == "length" and len(msg["content"]) > partial
    direct = httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 200,
        "temperature": 0}).json()
    assert msg["content"] == direct["choices"][0]["message"]["content"]
    # per-token view: the tokens spell the answer; a token shows its logprob and 5 alternatives
    assert "".join(t["text"] for t in msg["tokens"]) == msg["content"]
    last_output(ui).get_by_role("button", name="Show tokens").click()
    ui.locator("#messages .tok").nth(3).hover()
    info = ui.locator("#messages .token-info")
    expect(info).to_contain_text("logprob")
    expect(info.locator(".alternatives li")).to_have_count(5)
    ui.screenshot(path=str(IMAGES / "ui-chat-desktop.png"))


def test_stop_mid_stream_aborts_the_request_on_the_server(ui, server):
    set_field(ui, "max_tokens", 1500)
    send(ui, "Tell me a long story")
    expect(last_output(ui).locator(".body")).not_to_be_empty()
    expect(ui.locator("#status-running")).to_have_text("1")
    assert metric(metrics(server), "sarathi:num_requests_running") == 1
    ui.keyboard.press("Escape")
    expect(last_output(ui)).to_have_attribute("data-finish", "stopped")
    deadline = time.monotonic() + 10
    while metric(metrics(server), "sarathi:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = metrics(server)
    assert metric(text, "sarathi:num_requests_running") == 0
    generated = metric(text, "sarathi:generation_tokens_total")
    expect(ui.locator("#status-running")).to_have_text("0")
    time.sleep(0.5)
    assert metric(metrics(server), "sarathi:generation_tokens_total") == generated, "it kept generating"
    assert 0 < len(conversations(ui)[0]["messages"][-1]["content"])
    assert ui.locator("#send").is_enabled() and ui.locator("#stop").is_disabled()


def test_lora_adapter_from_the_picker_answers(ui, server):
    expect(ui.locator("#model option[value=a1]")).to_have_text("a1 (LoRA adapter of tiny)")
    set_field(ui, "temperature", 0)
    set_field(ui, "max_tokens", 12)
    ui.select_option("#model", "a1")
    send(ui, "Which adapter are you?")
    msg = wait_finished(ui)
    assert msg["model"] == "a1"
    expect(last_output(ui).locator(".role")).to_have_text("assistant · a1")

    def direct(model):
        return httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Which adapter are you?"}],
            "max_tokens": 12, "temperature": 0}).json()["choices"][0]["message"]["content"]

    assert msg["content"] == direct("a1") != direct("tiny")


def test_optimal_sampling_shows_alpha_per_token(ui):
    set_field(ui, "max_tokens", 10)
    ui.select_option("#os_target", "a1")     # the served model with adapter a1 as the target
    send(ui, "Some alpha please")
    msg = wait_finished(ui)
    assert msg["finish"] == "length" and len(msg["alpha"]) == len(msg["tokens"]) == 10
    assert all(isinstance(a, (int, float)) for a in msg["alpha"])
    expect(last_output(ui).locator(".alpha-fig polyline")).to_have_count(1)
    last_output(ui).get_by_role("button", name="Show tokens").click()
    ui.locator("#messages .tok").first.hover()
    expect(ui.locator("#messages .token-info")).to_contain_text(f"α {msg['alpha'][0]:.3f}")


def test_model_output_with_html_stays_inert_text(ui, server):
    ui.select_option("#mode", "completion")
    set_field(ui, "max_tokens", 4)
    send(ui, PAYLOAD)      # raw completion with echo: the server sends the payload back as output
    msg = wait_finished(ui)
    assert msg["content"].startswith(PAYLOAD) and msg["promptChars"] == len(PAYLOAD)
    out = last_output(ui)
    expect(out.locator(".body")).to_contain_text('<script>window.__pwned = 1</script> <img src=x onerror=')
    expect(out.locator(".body strong")).to_have_text("bold")        # markdown still renders
    # a conversation file is untrusted too: the same text as an imported assistant message
    data = {"conversations": [{"title": "imported", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": PAYLOAD + "\n\n```html\n" + PAYLOAD + "\n```"}]}]}
    ui.set_input_files("#conv-import", files=[{"name": "c.json", "mimeType": "application/json",
                                              "buffer": json.dumps(data).encode()}])
    expect(ui.locator("#messages .md pre code")).to_contain_text("<script>")
    ui.wait_for_timeout(300)
    assert ui.locator("#messages script, #messages img, #messages a, #messages iframe").count() == 0
    assert ui.evaluate("window.__pwned") is None
    # the per-token view of the echoed prompt is text as well
    ui.locator("#conv-list button", has_text=PAYLOAD[:20]).click()
    last_output(ui).get_by_role("button", name="Show tokens").click()
    expect(ui.locator("#messages .tok.prompt").first).to_be_visible()
    expect(ui.locator("#messages .tokens")).to_contain_text("<script>window.__pwned")
    assert ui.locator("#messages script, #messages img").count() == 0 and ui.evaluate("window.__pwned") is None


def test_conversations_export_and_import(ui, server):
    set_field(ui, "max_tokens", 6)
    ui.fill("#system", "You are terse.")
    ui.dispatch_event("#system", "input")
    send(ui, "Remember this")
    wait_finished(ui)
    with ui.expect_download() as download:
        ui.click("#conv-export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["format"] == "sarathi-ui-conversations"
    conv = exported["conversations"][0]
    assert conv["system"] == "You are terse." and [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    ui.evaluate("localStorage.clear()")
    ui.reload()
    expect(ui.locator("#messages article")).to_have_count(0)
    ui.set_input_files("#conv-import", files=[{"name": "c.json", "mimeType": "application/json",
                                              "buffer": json.dumps(exported).encode()}])
    expect(ui.locator("#messages article")).to_have_count(2)
    assert conversations(ui)[0]["messages"] == conv["messages"]
    assert ui.input_value("#system") == "You are terse."


def load(server, n=16, concurrency=4, max_tokens=96):
    """A bounded load: n streamed completions, `concurrency` at a time; returns the thread."""
    prompts = [f"Load request {i}: " + "word " * (20 + 7 * i) for i in range(n)]

    def worker(mine):
        with httpx.Client(timeout=120, headers=AUTH) as http:
            for prompt in mine:
                with http.stream("POST", server.base_url + "/v1/completions", json={
                        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                        "stream": True}) as r:
                    for _ in r.iter_lines():
                        pass

    threads = [threading.Thread(target=worker, args=(prompts[i::concurrency],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    return threads


def dashboard_figures(page):
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-metric]')]
        .filter(e => e.dataset.value !== undefined).map(e => [e.dataset.metric, Number(e.dataset.value)]))""")


def test_dashboard_moves_under_load_and_matches_metrics(ui, server):
    ui.goto(server.base_url + "/#dashboard")
    expect(ui.locator("#d-running")).to_have_attribute("data-value", "0")
    threads = load(server)
    seen = {"running": set(), "gen": [], "slots": set(), "steps": set(), "rate": []}
    while any(t.is_alive() for t in threads):
        seen["running"].add(int(ui.get_attribute("#d-running", "data-value")))
        seen["gen"].append(float(ui.get_attribute("#d-gen-total", "data-value")))
        seen["slots"].add(int(ui.get_attribute("#c-slots", "data-used") or 0))
        seen["steps"].add(ui.get_attribute("#c-steps", "data-steps"))
        seen["rate"].append(float(ui.get_attribute("#d-out-rate", "data-value")))
        if len(seen["gen"]) == 6:
            ui.screenshot(path=str(IMAGES / "ui-dashboard-desktop.png"), full_page=True)
        time.sleep(0.25)
    for t in threads:
        t.join()
    assert max(seen["running"]) >= 2, seen["running"]
    assert len(set(seen["gen"])) >= 4 and seen["gen"] == sorted(seen["gen"]), seen["gen"]
    assert max(seen["slots"]) >= 2 and max(seen["rate"]) > 0
    assert ui.locator("#c-steps rect.decode").count() > 0 and ui.locator("#c-steps rect.prefill").count() > 0
    expect(ui.locator("#d-budget")).to_contain_text("tokens")
    expect(ui.locator("#d-quant")).not_to_have_text("–")
    expect(ui.locator("#d-lora-slots li")).to_have_count(2)
    # once idle, every figure /metrics also exports is the same number
    deadline = time.monotonic() + 5
    while True:
        figures, scraped = dashboard_figures(ui), metrics(server)
        expected = {name: metric(scraped, name) for name in figures}
        if figures == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert figures == expected
    assert {"sarathi:generation_tokens_total", "sarathi:prompt_tokens_total", "sarathi:num_requests_running",
            "sarathi:time_to_first_token_seconds_count", "sarathi:kv_backend_bytes_mapped"} <= set(figures)
    assert figures["sarathi:time_to_first_token_seconds_count"] >= 16
    expect(ui.locator("#d-running")).to_have_text("0")


# Python source: the n-tokens of the test patch tokenizer (trained on stdlib modules) occur in it
PY_PROMPT = "    def __init__(self, prog=None, usage=None, description=None):\n        self.prog = prog\n"


@pytest.fixture(scope="module")
def patched_server(tmp_path_factory):
    from adaptivocab.patch_model import patch_model
    from adaptivocab_testutil import small_patch_tokenizer, tiny_llama_dir

    root = tmp_path_factory.mktemp("ui-patched")
    model = patch_model(tiny_llama_dir(root / "base"), small_patch_tokenizer(), root / "patched", init="exp")
    args = ["--model", str(model), "--kv-cache-memory", "64MiB", "--max-model-len", "512"]
    with running_server(args, root / "server.log") as proc:
        yield proc, model


def test_adaptivocab_ntokens_are_highlighted(browser, patched_server):
    from adaptivocab import PatchTokenizer

    server, model = patched_server
    tok = PatchTokenizer.from_pretrained(model)
    ntokens = sum(tok.is_ngram(t) for t in tok.encode(PY_PROMPT, add_special_tokens=False))
    assert ntokens > 0
    page, console = open_ui(browser, server, key=False)
    expect(page.locator("#model option")).to_have_count(1)
    page.select_option("#mode", "completion")
    set_field(page, "max_tokens", 2)
    send(page, PY_PROMPT)     # echoed with its logprobs: the prompt's tokens as the server split them
    wait_finished(page)
    last_output(page).get_by_role("button", name="Show tokens").click()
    expect(page.locator("#messages .tok.prompt.ntoken")).to_have_count(ntokens)
    page.locator("#messages .tok.ntoken").first.hover()
    expect(page.locator("#messages .token-info")).to_contain_text("n-token (AdaptiVocab)")
    page.context.close()
    assert console.errors == []


def test_phone_layout(browser, server):
    page, console = open_ui(browser, server, viewport=PHONE)
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    expect(page.locator("#sidebar")).to_be_hidden()
    page.click("#side-toggle")
    expect(page.locator("#sidebar")).to_be_visible()
    set_field(page, "max_tokens", 24)
    page.click("#side-toggle")
    send(page, "Hi from a phone")
    wait_finished(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=str(IMAGES / "ui-chat-phone.png"))
    page.click("#tab-dashboard")
    expect(page.locator("#d-running")).to_have_attribute("data-value", "0")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=str(IMAGES / "ui-dashboard-phone.png"), full_page=True)
    page.context.close()
    assert console.errors == []
