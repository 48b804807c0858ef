"""The web page at /: served files, the guard endpoint it polls, and the page itself in headless Chromium.

The browser test drives a real `capguard serve` with Debian's chromium + chromium-driver through selenium
(no driver download); it is skipped only when chromium is not installed (.ci/run installs it). Knobs for
running it by hand against other stacks: CAPGUARD_UI_CHECKPOINT (a checkpoint directory; default: the
tiny init_checkpoint "demo"), CAPGUARD_UI_VIDEO (a video file; default: a bench/videomaker clip) and
CAPGUARD_UI_SCREENSHOT (where the screenshot goes; default: the test's tmp dir).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_server_cli import start_serve, wait_ready

from capguard.server.app import create_app
from capguard.server.errors import ApiError
from capguard.server.routes.ui import STATIC_DIR, static_file
from capguard.server.storage import CaptionLog

STATUSES = {"warming_up", "ok", "collapsed"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400"]
UNTRUSTED = '<img src=x onerror="document.title=\'pwned\'"><b>굵게</b> 한옥'   # a caption that is markup


class PageParser(HTMLParser):
    """Collects element ids, the <meta charset> and every URL the page loads or links to."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.urls: list[str] = []
        self.charset: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "meta" and "charset" in attrs:
            self.charset = attrs["charset"]
        self.urls += [attrs[name] for name in ("src", "href", "action") if attrs.get(name)]


@pytest.fixture(scope="module")
def static_client(server_settings):
    """No lifespan (no `with`): serving the page needs no model."""
    return TestClient(create_app(server_settings()))


# ------------------------------------------------------------------------------------------ files


def test_page_has_its_elements_and_loads_nothing_from_another_origin(static_client):
    r = static_client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    page = PageParser()
    page.feed(r.text)
    assert page.charset == "utf-8"
    assert {"caption-form", "video", "checkpoint", "num-frames", "submit", "error", "result", "caption",
            "result-checkpoint", "result-fingerprint", "result-siglip", "frames", "timings", "result-guard",
            "live-guard", "checkpoints", "evaluations"} <= page.ids
    assert "/static/app.js" in page.urls and "/static/style.css" in page.urls
    external = [url for url in page.urls if re.match(r"(https?:)?//", url)]
    assert external == []
    assert "영상 캡션 서버" in r.text   # decoded as UTF-8


@pytest.mark.parametrize(("name", "media_type"), [("app.js", "text/javascript; charset=utf-8"),
                                                  ("style.css", "text/css; charset=utf-8")])
def test_static_files_are_served_and_reference_no_other_origin(static_client, name, media_type):
    r = static_client.get(f"/static/{name}")
    assert r.status_code == 200 and r.headers["content-type"] == media_type
    assert r.text == (STATIC_DIR / name).read_text(encoding="utf-8")
    assert re.search(r"https?://|@import|url\(", r.text) is None


FONT_STACK = '"Noto Sans KR", "Noto Sans CJK KR", "Apple SD Gothic Neo", "Malgun Gothic", sans-serif'
HANGUL = "한국어캡션"   # five syllables, each its own glyph in any real Korean face


def test_fonts_list_korean_faces_first(static_client):
    css = static_client.get("/static/style.css").text
    assert f"font-family: {FONT_STACK};" in css


def test_script_never_parses_strings_as_markup():
    script = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    assert "textContent" in script
    sinks = re.findall(r"\.(?:innerHTML|outerHTML|insertAdjacentHTML|createContextualFragment)\b|document\.write"
                       r"|\beval\(|new Function|DOMParser|srcdoc", script)
    assert sinks == [], f"app.js parses strings as markup ({sinks}); insert server strings with textContent"


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/.hidden.js", "/static/ui.py", "/static/"])
def test_unknown_static_paths_answer_404_in_the_api_shape(static_client, path):
    r = static_client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("name", ["../routes/ui.py", "../static/app.js", "..\\app.js", ".", ".."])
def test_static_file_refuses_paths_outside_its_folder(name):
    with pytest.raises(ApiError) as exc:
        static_file(name)
    assert exc.value.status == 404


# --------------------------------------------------------------------------------- guard endpoint


def test_guard_endpoint_reports_the_live_window(server_settings, video_files):
    with TestClient(create_app(server_settings())) as client:
        empty = client.get("/checkpoints/demo/guard")
        assert empty.status_code == 200, empty.text
        assert empty.json()["checkpoint"] == "demo"
        assert empty.json()["status"] == "warming_up" and empty.json()["window_captions"] == 0

        files = {"video": ("clip.mp4", video_files[0].read_bytes(), "video/mp4"), "max_new_tokens": (None, "4")}
        answer = client.post("/caption", files=files)
        assert answer.status_code == 200, answer.text
        guard = client.get("/checkpoints/demo/guard").json()
        assert guard == answer.json()["guard"]   # the state this caption produced, nothing newer
        assert guard["window_captions"] == 1 and guard["unique_ratio"] == 1.0

        not_loaded = client.get("/checkpoints/runs/epoch-1/guard")
        assert not_loaded.status_code == 404 and not_loaded.json()["error"]["code"] == "checkpoint_not_loaded"
        files["checkpoint"] = (None, "runs/epoch-1")
        assert client.post("/caption", files=files).status_code == 200
        nested = client.get("/checkpoints/runs/epoch-1/guard").json()   # a two-level name
        assert nested["checkpoint"] == "runs/epoch-1" and nested["window_captions"] == 1

        unknown = client.get("/checkpoints/nothing/guard")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_checkpoint"


# -------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def served(checkpoints_root, tmp_path_factory):
    """A `capguard serve` process on a free port: (url, data_dir)."""
    tmp = tmp_path_factory.mktemp("ui-serve")
    checkpoint = os.environ.get("CAPGUARD_UI_CHECKPOINT") or str(checkpoints_root / "demo")
    log = tmp / "serve.log"
    url, process = start_serve(checkpoint, tmp / "data", log)
    try:
        wait_ready(url, process, log)
        yield url, tmp / "data"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium through its own chromedriver; selenium downloads nothing."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium and chromium-driver are not installed "
                    "(apt-get install --no-install-recommends chromium chromium-driver; .ci/run does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    with tempfile.TemporaryDirectory(prefix="capguard-chromium-") as profile:
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SE_OFFLINE", "true")   # belt and braces: Selenium Manager must never fetch a driver
            driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def _text(driver, selector: str) -> str:
    return driver.find_element("css selector", selector).get_property("textContent")


@pytest.mark.slow
def test_page_captions_an_upload_and_shows_the_guard(served, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    url, data_dir = served
    driver = browser
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    ready = httpx.get(f"{url}/readyz").json()
    checkpoints = [c["name"] for c in httpx.get(f"{url}/checkpoints").json()["checkpoints"]]

    driver.get(f"{url}/")
    # the first poll fills the checkpoint list, the live guard and the evaluations
    wait.until(lambda d: len(d.find_elements("css selector", "#checkpoint option")) == 1 + len(checkpoints))
    assert [o.get_attribute("value") for o in driver.find_elements("css selector", "#checkpoint option")] == \
        ["", *checkpoints]
    live_badge = wait.until(lambda d: d.find_element("css selector", "#live-guard .badge"))
    assert live_badge.get_attribute("data-status") in STATUSES
    wait.until(lambda d: d.find_elements("css selector", "#evaluations table, #no-evaluations"))
    if not httpx.get(f"{url}/evaluations").is_success or not driver.find_elements("css selector", "#evaluations table"):
        assert _text(driver, "#evaluations") == "no evaluations"

    # an API error is shown as its code and message
    not_video = tmp_path / "notes.mp4"
    not_video.write_bytes(b"these are notes, not a video\n" * 20)
    driver.find_element("id", "video").send_keys(str(not_video))
    driver.find_element("id", "submit").click()
    wait.until(lambda d: d.find_element("id", "error").is_displayed())
    assert _text(driver, "#error-code") in {"not_a_video (415):", "corrupt_video (422):"}
    assert len(_text(driver, "#error-message")) > 10
    assert driver.find_element("id", "result").get_attribute("data-state") == "error"

    # a real video, 4 frames
    video = os.environ.get("CAPGUARD_UI_VIDEO")
    if video is None:
        from videomaker import make_video
        video = make_video(tmp_path / "clip.mp4", num_frames=48, size=(96, 64))
    driver.find_element("id", "num-frames").send_keys("4")
    driver.find_element("id", "video").send_keys(str(Path(video).resolve()))
    driver.find_element("id", "submit").click()
    wait.until(lambda d: d.find_element("id", "result").get_attribute("data-state") == "done")

    log = CaptionLog(data_dir / "capguard.db")
    try:
        rows = log.recent(ready["checkpoint"], 10)
    finally:
        log.close()
    assert len(rows) == 1
    caption = rows[0]["caption"]
    assert _text(driver, "#caption") == caption
    assert ("empty" in driver.find_element("id", "caption").get_attribute("class").split()) == (caption == "")
    assert not driver.find_element("id", "error").is_displayed()
    assert _text(driver, "#result-checkpoint") == ready["checkpoint"]
    assert _text(driver, "#result-fingerprint") == ready["fingerprint"][:12]
    assert len(driver.find_elements("css selector", "#frames li")) == 4
    assert all(float(_text(driver, f"#timings td[data-stage={s}]")) >= 0 for s in ("decode", "generate", "total"))
    guard = httpx.get(f"{url}/checkpoints/{ready['checkpoint']}/guard").json()
    result_badge = driver.find_element("css selector", "#result-guard .badge")
    assert result_badge.get_attribute("data-status") == guard["status"] and guard["status"] in STATUSES
    assert _text(driver, "#result-guard [data-figure=window_captions] td.num") == "1"
    # the page refreshes its live panel right after a caption
    wait.until(lambda d: _text(d, "#live-guard [data-figure=window_captions] td.num") == "1")

    shot = Path(os.environ.get("CAPGUARD_UI_SCREENSHOT") or tmp_path / "ui.png")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # a collapsed verdict: red badge, the tripped rules named and their rows marked; untrusted captions as text
    title = driver.title
    collapsed = {**guard, "status": "collapsed", "tripped": ["unique_ratio", "top_mode_share"],
                 "modes": [{"representative": UNTRUSTED, "count": 31, "share": 0.97}]}
    driver.execute_script("window.capguard.renderResult({caption: arguments[0], guard: arguments[1]});"
                          "window.capguard.renderGuard(document.getElementById('result-guard'), arguments[1]);",
                          UNTRUSTED, collapsed)
    assert driver.find_element("css selector", "#result-guard .badge").get_attribute("data-status") == "collapsed"
    assert _text(driver, "#result-guard .tripped-rules") == "rules tripped: unique_ratio, top_mode_share"
    marked = driver.find_elements("css selector", "#result-guard tr.tripped")
    assert [row.get_attribute("data-figure") for row in marked] == ["unique_ratio", "top_mode_share"]
    assert _text(driver, "#caption") == UNTRUSTED
    assert _text(driver, "#result-guard .mode-text") == UNTRUSTED   # (the live panel repaints on its own)
    assert driver.find_elements("css selector", "#caption *, #result-guard .modes img") == []
    assert driver.title == title
    if os.environ.get("CAPGUARD_UI_SCREENSHOT"):
        driver.save_screenshot(str(shot.with_name(f"{shot.stem}-collapsed{shot.suffix}")))


def korean_font_families() -> set[str]:
    """Families fontconfig says cover Korean, e.g. {"Noto Sans CJK KR", "Noto Serif CJK KR", ...}."""
    listed = subprocess.run(["fc-list", ":lang=ko", "family"], capture_output=True, text=True, timeout=30).stdout
    return {name.strip() for line in listed.splitlines() for name in line.split(",") if name.strip()}


@pytest.mark.slow
def test_hangul_renders_in_a_real_font_not_boxes(browser, tmp_path):
    """The page's own stylesheet in Chromium: Hangul must come out as glyphs of a Korean face (Debian's
    fonts-noto-cjk, which .ci/run installs), not as the missing-glyph box. Two independent checks: the
    font Chromium actually used for the text (DevTools' CSS.getPlatformFontsForNode) covers Korean, and
    five different syllables draw five different bitmaps, none of them the box an unassigned codepoint
    draws. Without a Korean font every syllable is that same box and both fail."""
    css = (STATIC_DIR / "style.css").read_text(encoding="utf-8")
    page = tmp_path / "fonts.html"
    page.write_text(f'<!doctype html><meta charset="utf-8"><style>{css}</style>'
                    f'<body><p id="ko" style="font-size:48px">{HANGUL}</p></body>', encoding="utf-8")
    driver = browser
    driver.get(page.as_uri())

    driver.execute_cdp_cmd("DOM.enable", {})
    driver.execute_cdp_cmd("CSS.enable", {})
    root = driver.execute_cdp_cmd("DOM.getDocument", {})["root"]["nodeId"]
    node = driver.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": "#ko"})["nodeId"]
    used = driver.execute_cdp_cmd("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    korean = korean_font_families()
    assert korean, "no font covers Korean (apt-get install fonts-noto-cjk; .ci/run does it)"
    assert used and all(f["familyName"] in korean for f in used), (used, sorted(korean))
    assert sum(f["glyphCount"] for f in used) == len(HANGUL)

    # canvas bitmaps drawn with the body's computed font stack, one per character
    bitmaps = driver.execute_script("""
        const family = getComputedStyle(document.body).fontFamily;
        const draw = (ch) => {
            const canvas = document.createElement("canvas");
            canvas.width = 64; canvas.height = 64;
            const g = canvas.getContext("2d");
            g.font = "48px " + family;
            g.fillText(ch, 4, 52);
            return canvas.toDataURL();
        };
        return {family: family, hangul: [...arguments[0]].map(draw), missing: draw("\u0378")};
    """, HANGUL)
    assert bitmaps["family"].startswith('"Noto Sans KR"'), bitmaps["family"]
    assert len(set(bitmaps["hangul"])) == len(HANGUL), "Hangul syllables draw the same shape: boxes?"
    assert bitmaps["missing"] not in bitmaps["hangul"]

    shot = Path(os.environ.get("CAPGUARD_UI_SCREENSHOT") or tmp_path / "ui.png")
    fonts_shot = shot.with_name(f"{shot.stem}-hangul{shot.suffix}")
    assert driver.find_element("id", "ko").screenshot(str(fonts_shot))
