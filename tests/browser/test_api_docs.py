"""The API docs pages (Swagger UI and Redoc) load in real Chromium from this server alone."""

from __future__ import annotations

import pytest

from annotation.roles import Role
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)

# Redoc always draws its maker's logo from their CDN; the page's
# Content-Security-Policy (img-src 'self' data:) makes the browser refuse it
# before anything is sent, which is all this URL may ever do.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.parametrize("path", ["/api/docs/", "/api/redoc/"])
def test_the_api_docs_load_with_no_request_leaving_the_server(open_page, live_server, artifacts_dir, path):
    manager = user_with_roles(Role.MANAGER, username="docreader")
    page, watch = open_page(manager)
    # what reaches the network layer for another host (the browser refuses
    # URLs the page's Content-Security-Policy forbids before this point)
    sent_elsewhere: list[str] = []

    def leave(route) -> None:  # type: ignore[no-untyped-def]
        sent_elsewhere.append(route.request.url)
        route.abort()

    page.route(lambda url: not url.startswith(live_server.url), leave)
    csp_messages: list[str] = []
    page.on(
        "console",
        lambda message: (
            csp_messages.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )

    # the navigation links the docs for a manager
    page.click("nav >> text=API")
    page.wait_for_url(f"{live_server.url}/api/docs/")
    page.goto(f"{live_server.url}{path}")

    # the schema is fetched and drawn: the API's title and one of its operations show
    page.wait_for_selector("text=Rankwise API", timeout=30_000)
    page.wait_for_selector("text=/api/projects/", timeout=30_000)
    page.wait_for_load_state("networkidle")
    assert sent_elsewhere == []
    assert set(watch.foreign_requests) <= {REDOC_LOGO}
    assert all(REDOC_LOGO in message for message in csp_messages), csp_messages
    assert watch.errors == []
    page.screenshot(path=str(artifacts_dir / f"api-{path.strip('/').split('/')[-1]}.png"))


def test_a_labeler_has_no_api_docs_link(open_page, live_server):
    labeler = user_with_roles(Role.LABELER, username="nodocs")
    page, _watch = open_page(labeler)
    assert page.locator("nav >> text=API").count() == 0
