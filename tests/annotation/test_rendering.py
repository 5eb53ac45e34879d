"""The one filter every untrusted text goes through."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from django.template import Context, Template

from annotation.rendering import markdown_to_safe_html

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![remote](http://203.0.113.9/pixel.png)",
    "<iframe src=//evil></iframe>",
    "<a href=x onclick=alert(1)>y</a>",
    "</div></main><script>x</script>",
    "<style>*{}</style>",
    "<!-- comment --><b>x</b>",
    "<details open ontoggle=alert(1)>",
]
ALLOWED_TAGS = {"p", "a", "code", "pre", "em", "strong", "ul", "ol", "li", "br", "blockquote"}


class ElementCollector(HTMLParser):
    """The elements and attributes a browser would build from the HTML (text does not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)


def elements_of(html: str) -> ElementCollector:
    collector = ElementCollector()
    collector.feed(html)
    return collector


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_markup_comes_out_inert(text):
    parsed = elements_of(markdown_to_safe_html(text))
    assert parsed.comments == []
    for tag, attrs in parsed.elements:
        assert tag in ALLOWED_TAGS, tag
        assert not any(name.startswith("on") for name in attrs), attrs
        href = (attrs.get("href") or "").lower()
        assert not href.startswith(("javascript:", "data:", "vbscript:")), href


def test_raw_html_stays_visible_as_text():
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown_to_safe_html("<script>alert(1)</script>")


def test_links_keep_their_target_but_cannot_reach_back_or_pass_rank():
    html = markdown_to_safe_html("[docs](https://example.com/a)")
    assert 'href="https://example.com/a"' in html
    assert 'rel="noopener noreferrer nofollow"' in html
    assert 'target="_blank"' in html


def test_markdown_that_helps_reading_survives():
    html = markdown_to_safe_html(
        "**bold** *it* `code`\n\n```python\nprint(1)\n```\n\n- a\n- b\n\n| x | y |\n|---|---|\n| 1 | 2 |"
    )
    for tag in ("<strong>", "<em>", "<code>", '<code class="language-python">', "<li>", "<table>"):
        assert tag in html


def test_the_template_filter_escapes_what_it_is_given():
    rendered = Template("{% load rankwise %}{{ text|markdown }}").render(
        Context({"text": "<b onmouseover=x>hi</b>"})
    )
    assert elements_of(rendered).elements == [("p", {})]
    assert "&lt;b onmouseover=x&gt;hi&lt;/b&gt;" in rendered
