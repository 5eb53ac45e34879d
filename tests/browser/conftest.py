"""Real Chromium (Debian's `chromium`) driven by Playwright against pytest-django's live server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.conf import settings

# Playwright's sync API runs an event loop in this thread; Django refuses ORM
# calls from a thread with a running loop unless told the code is synchronous,
# which it is here (the test talks to the database between browser steps).
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "Browser tests need Chromium: install Debian's package (`apt-get install chromium`) "
            "or set CHROMIUM=/path/to/chrome."
        )
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not (Path(settings.BASE_DIR) / "static" / "vendor" / "chart.js" / "chart.umd.js").exists():
        pytest.fail("The pages' chart library is missing: run `make vendor` (make test does it).")

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True
        )
        yield instance
        instance.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Screenshots land here (kept after the run, for people to look at)."""
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(settings.BASE_DIR) / "var" / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class PageWatch:
    """Everything a page did that a hostile payload could cause: dialogs, off-site requests, errors."""

    def __init__(self, page: object, server_url: str) -> None:
        self.dialogs: list[str] = []
        self.foreign_requests: list[str] = []
        self.errors: list[str] = []
        host = urlparse(server_url).netloc

        def on_dialog(dialog: object) -> None:
            self.dialogs.append(dialog.message)  # type: ignore[attr-defined]
            dialog.dismiss()  # type: ignore[attr-defined]

        def on_request(request: object) -> None:
            url = urlparse(request.url)  # type: ignore[attr-defined]
            if url.scheme not in ("data", "blob", "about") and url.netloc != host:
                self.foreign_requests.append(request.url)  # type: ignore[attr-defined]

        page.on("dialog", on_dialog)  # type: ignore[attr-defined]
        page.on("request", on_request)  # type: ignore[attr-defined]
        page.on("pageerror", lambda error: self.errors.append(str(error)))  # type: ignore[attr-defined]


@pytest.fixture
def open_page(browser: object, live_server: object) -> Iterator[Callable[..., tuple[object, PageWatch]]]:
    """open_page(user, viewport=(w, h), touch=False, locale="en") -> (signed-in page, its PageWatch)."""
    from tests.factories import PASSWORD

    contexts = []

    def open_(
        user: object, *, viewport: tuple[int, int] = (1280, 900), touch: bool = False, locale: str = "en"
    ):  # type: ignore[no-untyped-def]
        context = browser.new_context(  # type: ignore[attr-defined]
            viewport={"width": viewport[0], "height": viewport[1]}, has_touch=touch, locale=locale
        )
        contexts.append(context)
        page = context.new_page()
        watch = PageWatch(page, live_server.url)  # type: ignore[attr-defined]
        page.goto(f"{live_server.url}/accounts/login/")  # type: ignore[attr-defined]
        page.fill("#id_username", user.username)  # type: ignore[attr-defined]
        page.fill("#id_password", PASSWORD)
        page.click("main button[type=submit]")
        page.wait_for_url(f"{live_server.url}/")  # type: ignore[attr-defined]
        return page, watch

    yield open_
    for context in contexts:
        context.close()


from tests.annotation.conftest import make_project  # noqa: E402, F401  (shared fixture)
