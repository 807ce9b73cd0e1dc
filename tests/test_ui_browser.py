"""The chat page in a real headless Chromium (Playwright) against `python server.py` on SmolLM2.

Chromium is Debian's /usr/bin/chromium (`make test` installs it); Playwright's own browser
downloads are not used. Screenshots of the main states go to tests/artifacts/ui/ (git-ignored).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from tests.conftest import GEMMA, ROOT, SMOL, ServerProcess, require_model

pytestmark = [pytest.mark.real_model, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts" / "ui"
GEN_TIMEOUT_MS = 240_000  # NOTE: a generous bound for a loaded 2-core machine, not a timing
API_KEY = "sk-ui-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _server(tmp: Path, *args: str) -> ServerProcess:
    return ServerProcess(
        tmp / "server.log", "--model_name", SMOL, "--n_ctx", "2048", "--n_threads", "2",
        "--no_announce", "--cache_dir", str(tmp / "cache"), *args,
    )


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_model(SMOL)
    server = _server(tmp_path_factory.mktemp("ui-server"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (empty localStorage) per test; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light")
    p = context.new_page()
    problems: list[str] = []
    p.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    p.on("dialog", lambda d: (problems.append(f"unexpected dialog: {d.message}"), d.dismiss()))
    try:
        yield p
    finally:
        context.close()
    assert not problems


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def open_ui(page: Page, server: ServerProcess) -> None:
    page.goto(f"{server.base_url}/ui")
    page.wait_for_selector("#model option", state="attached")


def set_settings(page: Page, **values: Any) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page: Page) -> None:
    page.wait_for_function(
        "() => !document.body.classList.contains('streaming')", timeout=GEN_TIMEOUT_MS
    )


def reply(page: Page) -> Any:
    return page.locator("article.msg.assistant").last


def stat(page: Page, key: str) -> str:
    return str(reply(page).locator(f'[data-stat="{key}"] b').inner_text())


def finished_line(server: ServerProcess, gen_id: str, timeout: float = 60) -> tuple[str, int, int]:
    """(finish reason, prompt tokens, completion tokens) from the server's log line."""
    pattern = re.compile(
        re.escape(gen_id) + r" finished \((\w+)\): (\d+) prompt \+ (\d+) completion"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(server.log())
        if m:
            return m.group(1), int(m.group(2)), int(m.group(3))
        time.sleep(0.1)
    raise AssertionError(f"no log line for {gen_id}")


def assert_nothing_active(page: Page) -> None:
    """No image, no inline handler, no link other than http(s) in what the page rendered."""
    found = page.evaluate(
        """() => {
            const bad = [];
            for (const node of document.querySelectorAll('#messages *, #conversations *')) {
                if (['IMG', 'SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'SVG', 'STYLE']
                        .includes(node.tagName.toUpperCase())) bad.push(node.tagName);
                for (const a of node.attributes) {
                    if (/^on/i.test(a.name) || a.name === 'style' && /url/i.test(a.value))
                        bad.push(`${node.tagName}[${a.name}]`);
                }
                if (node.tagName === 'A' && !/^https?:\\/\\//.test(node.getAttribute('href')))
                    bad.push(`A[href=${node.getAttribute('href')}]`);
            }
            return {bad, xss: window.__xss ?? null};
        }"""
    )
    assert found == {"bad": [], "xss": None}


def wait_text(page: Page, chars: int) -> None:
    """Until the streaming reply shows more than `chars` characters."""
    page.wait_for_function(
        """(n) => {
            const c = document.querySelector('article.assistant[data-streaming="true"] .content');
            return c !== null && c.textContent.replace('▍', '').length > n;
        }""",
        arg=chars, timeout=GEN_TIMEOUT_MS,
    )


def watch_growth(page: Page) -> None:
    """Record the streaming reply's text at every DOM change, in window.__seen."""
    page.evaluate(
        """() => {
            window.__seen = [];
            new MutationObserver(() => {
                const c = document.querySelector(
                    'article.assistant[data-streaming="true"] .content');
                if (c && c.textContent.replace('▍', '')) window.__seen.push(
                    c.textContent.replace('▍', ''));
            }).observe(document.getElementById('messages'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )


def test_chat_streams_and_shows_stats(page: Page, ui_server: ServerProcess) -> None:
    open_ui(page, ui_server)
    assert page.locator("#model").input_value() == SMOL
    page.wait_for_selector("#model-state[data-state=ready]")
    set_settings(page, temperature=0, max_tokens=40)
    watch_growth(page)
    send(page, "Name three colors of the rainbow.")
    assert page.locator("#stop").is_visible()
    wait_text(page, 0)
    shot(page, "01-streaming")
    wait_idle(page)
    seen: list[str] = page.evaluate("window.__seen")
    final = reply(page).locator(".content").inner_text()
    assert final.strip()
    assert len(set(seen)) >= 2, seen  # the reply grew in the page while it streamed
    gen_id = reply(page).get_attribute("data-completion-id")
    assert gen_id and gen_id.startswith("chatcmpl-")
    reason, prompt, completion = finished_line(ui_server, gen_id)
    assert reason in {"stop", "length"}
    assert stat(page, "finish_reason") == reason
    assert int(stat(page, "prompt_tokens")) == prompt
    assert int(stat(page, "completion_tokens")) == completion
    assert int(stat(page, "cached_tokens")) >= 0
    assert int(stat(page, "ttft_ms")) >= 0
    if completion > 1:
        assert float(stat(page, "tokens_per_s")) > 0
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    page.click("#cache-panel summary")
    page.wait_for_selector('#cache-stats dd[data-key="mode"]')
    assert page.locator('#cache-stats dd[data-key="mode"]').inner_text() == "tiered"
    shot(page, "02-reply")
    assert_nothing_active(page)

    # kept in localStorage: a reload shows the same conversation in the sidebar
    page.reload()
    page.wait_for_selector("#conversations li")
    assert page.locator("#conversations li").count() == 1
    assert "Name three colors" in page.locator("#conversations li").inner_text()
    assert reply(page).locator(".content").inner_text() == final
    assert int(stat(page, "completion_tokens")) == completion

    # copy a reply
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    reply(page).locator("button.copy").click()
    page.wait_for_selector("article.assistant button.copy:text('Copied')")
    stored = page.evaluate("JSON.parse(localStorage['llmserve.conversations'])")
    content = stored[0]["messages"][1]["content"]
    assert page.evaluate("navigator.clipboard.readText()") == content

    # regenerate: same conversation, the reply replaced (greedy: the same text)
    reply(page).locator("button.regenerate").click()
    wait_idle(page)
    assert page.locator("article.msg").count() == 2
    new_id = reply(page).get_attribute("data-completion-id")
    assert new_id and new_id != gen_id
    assert reply(page).locator(".content").inner_text().strip()

    # edit and resend the user message: the conversation restarts from it
    set_settings(page, max_tokens=16)
    page.locator("article.user button.edit").click()
    page.fill("article.user textarea.edit-area", "Name one animal.")
    page.press("article.user textarea.edit-area", "Enter")
    wait_idle(page)
    assert page.locator("article.msg").count() == 2
    assert page.locator("article.user .text").inner_text() == "Name one animal."
    assert reply(page).get_attribute("data-completion-id") not in {gen_id, new_id}
    assert "Name one animal" in page.locator("#conversations li").inner_text()


def test_stop_aborts_and_the_server_cancels(page: Page, ui_server: ServerProcess) -> None:
    def endless(route: Route) -> None:
        # NOTE: the page has no ignore_eos; the test adds it so the reply cannot end first.
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", endless)
    open_ui(page, ui_server)
    set_settings(page, max_tokens=2000)
    for how in ("button", "escape"):
        if how == "button":
            send(page, "Tell me a very long story about a dragon.")
        else:
            reply(page).locator("button.regenerate").click()
        wait_text(page, 10)
        gen_id = reply(page).get_attribute("data-completion-id")
        assert gen_id
        if how == "button":
            shot(page, "03-before-stop")
            page.click("#stop")
        else:
            page.keyboard.press("Escape")
        wait_idle(page)
        assert stat(page, "finish_reason") == "stopped"
        assert len(reply(page).locator(".content").inner_text()) > 10  # the partial reply stays
        reason, _, produced = finished_line(ui_server, gen_id)
        assert reason == "cancelled"
        assert produced < 2000
    shot(page, "04-stopped")
    assert page.locator("article.msg").count() == 2


def test_switch_model_keeps_settings_per_model(page: Page, ui_server: ServerProcess) -> None:
    require_model(GEMMA)
    open_ui(page, ui_server)
    assert page.locator("#model").input_value() == SMOL
    set_settings(page, temperature=0.3, system="Answer briefly.")
    page.evaluate(
        """() => {
            window.__states = [];
            const s = document.getElementById('model-state');
            new MutationObserver(() => window.__states.push(s.dataset.state))
                .observe(s, {attributes: true, childList: true});
        }"""
    )
    page.select_option("#model", GEMMA)
    assert page.locator("#model-state").get_attribute("data-state") == "loading"
    shot(page, "05-switching")
    page.wait_for_selector(f"#model-state[data-state=ready]:has-text('{GEMMA}')",
                           timeout=GEN_TIMEOUT_MS)
    assert "loading" in page.evaluate("window.__states")
    assert httpx.get(f"{ui_server.base_url}/").json()["model"] == GEMMA
    # gemma has its own (empty) settings
    assert page.locator("#temperature").input_value() == ""
    assert page.locator("#system").input_value() == ""
    set_settings(page, temperature=0, max_tokens=12)
    send(page, "Say hello.")
    wait_idle(page)
    assert reply(page).locator(".model-name").inner_text() == GEMMA
    assert int(stat(page, "completion_tokens")) > 0
    shot(page, "06-gemma")
    # back to SmolLM2: its settings come back
    page.select_option("#model", SMOL)
    page.wait_for_selector(f"#model-state[data-state=ready]:has-text('{SMOL}')",
                           timeout=GEN_TIMEOUT_MS)
    assert page.locator("#temperature").input_value() == "0.3"
    assert page.locator("#system").input_value() == "Answer briefly."
    assert httpx.get(f"{ui_server.base_url}/").json()["model"] == SMOL


def test_api_key_prompt(page: Page, tmp_path_factory: pytest.TempPathFactory) -> None:
    require_model(SMOL)
    server = _server(tmp_path_factory.mktemp("ui-key-server"), "--api_key", API_KEY)
    try:
        server.wait_ready()
        sent: list[str | None] = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization"))
                if "/v1/models" in r.url else None)
        page.goto(f"{server.base_url}/ui")  # the page itself is public
        page.wait_for_selector("#key-dialog[open]")
        assert "needs an API key" in page.locator("#key-reason").inner_text()
        shot(page, "07-key-prompt")
        page.fill("#key-input", "sk-wrong")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-dialog[open] #key-reason:has-text('rejected')")
        page.fill("#key-input", API_KEY)
        page.click("#key-save")
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#key-dialog").get_attribute("open") is None
        assert page.evaluate("localStorage['llmserve.apiKey']") == API_KEY
        assert sent[-1] == f"Bearer {API_KEY}"
        assert "Bearer sk-wrong" in sent

        # asked once: a reload uses the stored key, chat works with it
        page.reload()
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#key-dialog").get_attribute("open") is None
        set_settings(page, max_tokens=8)
        send(page, "Hi")
        wait_idle(page)
        assert int(stat(page, "completion_tokens")) > 0

        # a key the server no longer takes: a 401 asks again
        page.evaluate("localStorage['llmserve.apiKey'] = 'sk-revoked'")
        page.reload()
        page.wait_for_selector("#key-dialog[open] #key-reason:has-text('rejected')")
        page.fill("#key-input", API_KEY)
        page.click("#key-save")
        page.wait_for_selector("#model option", state="attached")
    finally:
        server.stop()


XSS = "\n".join([
    "Plain **bold** and *italic* and `code` and ~~gone~~.",
    "",
    "<img src=x onerror=\"window.__xss='img'\"> and <script>window.__xss='script'</script>",
    "",
    "[click me](javascript:window.__xss='link') [data](data:text/html,<b>x</b>) "
    "[ok](https://example.com/safe) ![pic](javascript:window.__xss='pic') "
    "<a href=\"javascript:window.__xss='a'\">raw link</a>",
    "",
    "```html",
    "<img src=x onerror=window.__xss='code'>",
    "```",
    "",
    "| a | b |",
    "|---|--:|",
    "| <i onmouseover=window.__xss='td'>x</i> | 2 |",
    "",
    "- one",
    "- two [nested](vbscript:x)",
    "",
    "> quoted <svg onload=window.__xss='svg'>",
])


def _seed(page: Page, server: ServerProcess) -> None:
    conversations = [
        {"id": "c-xss", "title": "<img src=x onerror=window.__xss='title'>", "updated": 2,
         "messages": [
             {"role": "user", "content": "<b onclick=window.__xss='user'>hi</b>"},
             {"role": "assistant", "content": XSS, "model": "<i>model</i>",
              "reasoning": "<img src=x onerror=window.__xss='reasoning'> thinking",
              "tool_calls": [{"id": "call_1", "name": "<img src=x onerror=1>",
                              "arguments": '{"city": "<img src=x>"}'}],
              "stats": {"prompt_tokens": 12, "cached_tokens": 0, "completion_tokens": 30,
                        "ttft_ms": 40.2, "tokens_per_s": 55.5, "finish_reason": "stop"}},
         ]},
        {"id": "c-other", "title": "Another chat", "updated": 1,
         "messages": [{"role": "user", "content": "Earlier question"}]},
    ]
    open_ui(page, server)
    page.evaluate(
        "([c]) => { localStorage['llmserve.conversations'] = JSON.stringify(c);"
        " localStorage['llmserve.current'] = JSON.stringify('c-xss'); }", [conversations],
    )
    page.reload()
    page.wait_for_selector("article.assistant")


def test_stored_reply_renders_as_text(page: Page, ui_server: ServerProcess) -> None:
    _seed(page, ui_server)
    content = reply(page).locator(".content")
    text = content.inner_text()
    assert "<img src=x onerror=" in text and "<script>" in text
    assert "[click me](javascript:window.__xss='link')" in text
    links = content.locator("a")
    assert links.count() == 1
    assert links.first.get_attribute("href") == "https://example.com/safe"
    assert links.first.get_attribute("rel") == "noopener noreferrer nofollow"
    assert content.locator("strong").inner_text() == "bold"
    assert content.locator("em").inner_text() == "italic"
    assert content.locator("del").inner_text() == "gone"
    assert "<img src=x onerror=window.__xss='code'>" in content.locator("pre code").inner_text()
    assert content.locator("table td").first.inner_text().startswith("<i onmouseover")
    assert content.locator("ul li").count() == 2
    assert content.locator("blockquote").count() == 1
    details = reply(page).locator("details.reasoning")
    assert details.get_attribute("open") is None  # collapsed
    assert "onerror" in details.locator(".md").text_content()
    assert "Tool call: <img src=x onerror=1>" in reply(page).locator(".tool-call").inner_text()
    user = page.locator("article.user .text").inner_text()
    assert user == "<b onclick=window.__xss='user'>hi</b>"
    for selector in ("article.user .text", "article.assistant .content",
                     "article.assistant .tool-call"):
        page.locator(selector).first.hover()
        page.locator(selector).first.click()
    page.locator(".content :text('click me')").click()
    shot(page, "08-untrusted-stored")
    assert_nothing_active(page)

    # the sidebar: listed newest first, opens, deletes
    titles = page.locator("#conversations li .open").all_inner_texts()
    assert titles == ["<img src=x onerror=window.__xss='title'>", "Another chat"]
    page.click("#conversations li[data-id=c-other] .open")
    assert page.locator("article.user .text").inner_text() == "Earlier question"
    page.click("#conversations li[data-id=c-xss] .delete")
    assert page.locator("#conversations li").count() == 1
    stored = page.evaluate("JSON.parse(localStorage['llmserve.conversations'])")
    assert [c["id"] for c in stored] == ["c-other"]
    page.click("#new-chat")
    assert page.locator("article.msg").count() == 0
    assert page.locator("#empty").is_visible()
    assert_nothing_active(page)


PAYLOADS = [
    "<img src=x onerror=window.__xss=1>",
    "<svg/onload=window.__xss=1>",
    "<iframe src=javascript:window.__xss=1>",
    "[a](javascript:window.__xss=1)",
    "[a](JaVaScRiPt:window.__xss=1)",
    "[a](\tjavascript:window.__xss=1)",
    "[a](java\nscript:window.__xss=1)",
    "[a](&#106;avascript:window.__xss=1)",
    "[a](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[a](//evil.example/x)",
    "[a](/relative)",
    "![a](https://evil.example/track.png)",
    "<https://ok.example/a>",
    "<javascript:window.__xss=1>",
    "[x](https://ok.example/\"onmouseover=\"window.__xss=1)",
    "`<img src=x onerror=window.__xss=1>`",
    "**<img src=x onerror=window.__xss=1>**",
    "| <img src=x onerror=window.__xss=1> |\n|---|\n| [a](javascript:x) |",
    "> <script>window.__xss=1</script>",
    "- [a](vbscript:x)\n  - <img src=x onerror=window.__xss=1>",
    "```\n</code></pre><img src=x onerror=window.__xss=1>\n```",
    "*" * 3000 + "a" + "_" * 3000,
    "*a " * 2000,
    "[" * 2000 + "](" * 2000,
    ">" * 200 + " deep",
    "".join(f"{'  ' * i}- level {i}\n" for i in range(60)),
]


def test_renderer_keeps_untrusted_text_inert(page: Page, ui_server: ServerProcess) -> None:
    """markdown.js on hostile inputs: only http(s) links, no other element can act."""
    open_ui(page, ui_server)
    result = page.evaluate(
        """async (payloads) => {
            const md = await import(new URL('markdown.js', document.baseURI).href);
            const out = [];
            for (const text of payloads) {
                const box = document.createElement('div');
                box.appendChild(md.renderMarkdown(text));
                document.getElementById('messages').appendChild(box);
                const tags = [...box.querySelectorAll('*')].map((n) => n.tagName);
                const hrefs = [...box.querySelectorAll('a')].map((a) => a.getAttribute('href'));
                const attrs = [...box.querySelectorAll('*')].flatMap(
                    (n) => [...n.attributes].map((a) => a.name));
                out.push({tags: [...new Set(tags)], hrefs, attrs: [...new Set(attrs)]});
            }
            return out;
        }""",
        PAYLOADS,
    )
    allowed_tags = {"P", "BR", "STRONG", "EM", "DEL", "CODE", "PRE", "A", "UL", "OL", "LI",
                    "BLOCKQUOTE", "H1", "H2", "H3", "H4", "H5", "H6", "HR", "TABLE", "THEAD",
                    "TBODY", "TR", "TH", "TD", "DIV", "SPAN", "BUTTON"}
    allowed_attrs = {"class", "href", "rel", "target", "type", "style", "data-lang", "start"}
    for payload, r in zip(PAYLOADS, result, strict=True):
        assert set(r["tags"]) <= allowed_tags, (payload[:60], r["tags"])
        assert set(r["attrs"]) <= allowed_attrs, (payload[:60], r["attrs"])
        assert all(re.match(r"https?://", h) for h in r["hrefs"]), (payload[:60], r["hrefs"])
    assert result[PAYLOADS.index("<https://ok.example/a>")]["hrefs"] == ["https://ok.example/a"]
    assert result[PAYLOADS.index("![a](https://evil.example/track.png)")]["tags"] == ["P", "A"]
    assert_nothing_active(page)


def test_keyboard_and_errors(page: Page, ui_server: ServerProcess) -> None:
    """Shift+Enter adds a line (Enter sends); a refused request shows the server's message."""
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body=json.dumps({"error": {"message": "prompt is too long <b>x</b>",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "context_length_exceeded"}})))
    open_ui(page, ui_server)
    page.click("#input")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.locator("#input").input_value() == "first line\nsecond line"
    assert page.locator("article.msg").count() == 0
    page.keyboard.press("Enter")
    wait_idle(page)
    assert page.locator("article.user .text").inner_text() == "first line\nsecond line"
    assert reply(page).locator(".error").inner_text() == "prompt is too long <b>x</b>"
    assert page.locator("#input").input_value() == ""
    assert_nothing_active(page)


def test_streamed_reply_renders_as_text(page: Page, ui_server: ServerProcess) -> None:
    """Untrusted text arriving over SSE, cut mid-tag, plus reasoning and tool-call deltas."""
    pieces = ["Here: <img src=x on", "error=\"window.__xss='s'\"> [x](java", "script:window"
              ".__xss='sl') **done**"]
    base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
            "model": SMOL}

    def chunk(delta: dict[str, Any] | None, reason: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
        return "data: " + json.dumps({**base, "choices": choices, **extra}) + "\r\n\r\n"

    events = [chunk({"role": "assistant", "content": ""}),
              chunk({"reasoning_content": "<img src=x onerror=window.__xss='r'>hmm"})]
    events += [chunk({"content": p}) for p in pieces]
    events += [
        chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"<b>Paris</b>"}'}}]}),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16,
                           "prompt_tokens_details": {"cached_tokens": 3}}),
        "data: [DONE]\r\n\r\n",
    ]

    def scripted(route: Route) -> None:
        route.fulfill(status=200, headers={"content-type": "text/event-stream"},
                      body="".join(events))

    open_ui(page, ui_server)
    page.route("**/v1/chat/completions", scripted)
    send(page, "anything")
    wait_idle(page)
    content = reply(page).locator(".content")
    assert content.inner_text() == (
        "Here: <img src=x onerror=\"window.__xss='s'\"> [x](javascript:window.__xss='sl') done")
    assert content.locator("strong").inner_text() == "done"
    assert reply(page).locator("details.reasoning").get_attribute("open") is None
    assert "get_weather" in reply(page).locator(".tool-name").inner_text()
    assert json.loads(reply(page).locator(".tool-args").inner_text()) == {"city": "<b>Paris</b>"}
    assert stat(page, "cached_tokens") == "3"
    assert stat(page, "completion_tokens") == "7"
    assert stat(page, "finish_reason") == "tool_calls"
    reply(page).locator("details.reasoning summary").click()
    shot(page, "09-untrusted-streamed")
    assert_nothing_active(page)


def test_dark_scheme(browser: Browser, ui_server: ServerProcess) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="dark")
    try:
        p = context.new_page()
        _seed(p, ui_server)
        bg = p.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(23, 25, 28)"
        shot(p, "10-dark")
    finally:
        context.close()
