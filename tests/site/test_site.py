"""Real-browser checks of the built book: bash scripts/build_book.sh && pytest tests/site -q

Every test taking ``docname`` runs once per page of _toc.yml (see conftest.py), so new chapters
are covered as soon as they are listed. Full-page screenshots go to _build/screenshots/.
"""

from __future__ import annotations

import re
import time
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.site

STOPWORDS = {"this", "that", "with", "from", "what", "when", "where", "which", "does", "your"}


def _is_local(url: str, base_url: str) -> bool:
    """Network requests (http, https, ws, wss) must go to the local server; data:, blob: and
    Chromium's own chrome://... pages are not network traffic."""
    if urlsplit(url).scheme not in ("http", "https", "ws", "wss", "ftp"):
        return True
    return url == base_url or url.startswith(base_url + "/")


def _path_of(url: str) -> str:
    return unquote(urlsplit(url).path)


def test_no_console_errors(visit, base_url, docname):
    report = visit(docname)
    # Chromium asks every server for /favicon.ico when a page names no icon; not the book's fault.
    errors = [e for e in report.console_errors if not e.startswith(f"{base_url}/favicon.ico ")]
    assert errors == [], f"{report.url}: console errors {errors}"


def test_no_requests_leave_the_site(visit, base_url, docname):
    report = visit(docname)
    outside = [u for u in report.requests if not _is_local(u, base_url)]
    assert outside == [], f"{report.url} requested resources outside the site (CDN?): {outside}"


def test_widgets_render(visit, docname, widget_required):
    """A page shows widgets iff its executed notebook saved widget state (chapter 1 must)."""
    report = visit(docname)
    expected = report.widget_state_expected or docname in widget_required
    assert report.widgets_rendered == report.widget_views, (
        f"{report.url}: {report.widget_views} widget views on the page, "
        f"only {report.widgets_rendered} rendered (blank widgets: is the JS served offline?)"
    )
    if expected:
        assert report.widget_views > 0, (
            f"{report.url}: expected an ipywidget (notebook has widget state or the chapter "
            f"requires one) but the page holds no widget view"
        )
        assert report.widgets_rendered > 0
    if docname in widget_required:
        assert report.widget_state_expected, (
            f"{docname}: executed notebook in _build/jupyter_execute has no saved widget state"
        )


def test_math_typeset(visit, docname):
    report = visit(docname)
    assert report.mjx_errors == 0, f"{report.url}: {report.mjx_errors} MathJax errors"
    if report.math_nodes:
        assert report.mjx_containers >= report.math_nodes, (
            f"{report.url}: {report.math_nodes} maths elements, only {report.mjx_containers} "
            f"typeset by MathJax (raw TeX shown: is MathJax served offline?)"
        )


def test_images_load(visit, docname):
    report = visit(docname)
    broken = [i["src"] for i in report.images if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == [], f"{report.url}: images that did not load: {broken}"
    if report.png_expected:
        plots = [
            i for i in report.images
            if i["in_output"] and re.search(r"(\.png$|^data:image/png)", i["src"])
            and i["naturalWidth"] > 0
        ]
        assert plots, f"{report.url}: the notebook has a PNG output but no plot image is shown"


def test_screenshot_saved(visit, docname):
    report = visit(docname)
    assert report.screenshot is not None and report.screenshot.is_file()
    assert report.screenshot.stat().st_size > 5_000, f"{report.screenshot} looks empty"


def test_navigation(browser, base_url, toc, docname):
    """The next-page link leads to the next page of the TOC (the last page: previous link)."""
    from selenium.webdriver.common.by import By

    i = toc.index(docname)
    if i + 1 < len(toc):
        selector, target = "a.right-next", toc[i + 1]
    elif i > 0:
        selector, target = "a.left-prev", toc[i - 1]
    else:
        pytest.fail("the table of contents lists a single page: nothing to navigate to")
    browser.get(f"{base_url}/{docname}.html")
    links = browser.find_elements(By.CSS_SELECTOR, selector)
    assert links, f"{docname}: no {selector} link"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", links[0])
    links[0].click()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _path_of(browser.current_url).endswith(f"/{docname}.html"):
        time.sleep(0.1)
    assert _path_of(browser.current_url).endswith(f"/{target}.html"), (
        f"{docname}: {selector} led to {browser.current_url}, expected {target}.html"
    )
    assert browser.find_elements(By.CSS_SELECTOR, "article h1, main h1"), "landed on an empty page"


def _search_word(title: str) -> str:
    words = [w for w in re.findall(r"[A-Za-z]{4,}", title) if w.lower() not in STOPWORDS]
    assert words, f"no searchable word in the page title {title!r}"
    return max(words, key=len)


def test_search_finds_page(browser, visit, base_url, docname):
    """search.html?q=<longest word of the page title> lists the page."""
    from selenium.webdriver.common.by import By

    word = _search_word(visit(docname).title)
    browser.get(f"{base_url}/search.html?q={word}")
    deadline = time.monotonic() + 20
    hrefs: list[str] = []
    while time.monotonic() < deadline:
        hrefs = [
            a.get_attribute("href") or ""
            for a in browser.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a")
        ]
        if any(_path_of(h).endswith(f"/{docname}.html") for h in hrefs):
            break
        time.sleep(0.2)
    assert any(_path_of(h).endswith(f"/{docname}.html") for h in hrefs), (
        f"search for {word!r} did not list {docname}.html; results: {hrefs}"
    )


def test_toolchain_renders_widget_math_and_plot(visit, toc):
    """Across the book at least one page shows each of: a widget, typeset maths, a plot."""
    reports = [visit(d) for d in toc]
    assert any(r.widgets_rendered and r.dropdowns for r in reports) or any(
        r.widgets_rendered for r in reports
    ), "no page of the book renders an ipywidget"
    assert any(r.mjx_containers for r in reports), "no page of the book has typeset maths"
    assert any(
        i["in_output"] and i["naturalWidth"] > 0 for r in reports for i in r.images
    ), "no page of the book shows a plot"
