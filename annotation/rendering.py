"""Untrusted text (prompts, model outputs, instructions) into safe HTML.

Two independent layers, so a bug in one does not open the page:

1. markdown-it renders CommonMark with raw HTML off (a `<script>` stays
   visible text) and images off (`![x](url)` stays text, nothing is fetched);
2. nh3 (the ammonia sanitizer) keeps an allow-list of tags and attributes,
   only http(s) and mailto links, and stamps every link with
   `rel="noopener noreferrer nofollow"`.

The page's Content-Security-Policy (`script-src 'self'`) is the third.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import nh3
from markdown_it import MarkdownIt

ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "kbd", "sub", "sup",
    "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
    "table", "thead", "tbody", "tr", "th", "td", "a",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "code": {"class"},  # language-xyz from fenced code blocks
    "ol": {"start"},
    "th": {"align"},
    "td": {"align"},
}
LINK_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer nofollow"


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    return _markdown_renderer()


@lru_cache(maxsize=1)
def _markdown_without_links() -> MarkdownIt:
    renderer = _markdown_renderer()
    renderer.disable(["link", "autolink"])
    return renderer


def _markdown_renderer() -> MarkdownIt:
    renderer = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    renderer.enable(["table", "strikethrough"])
    renderer.disable("image")
    return renderer


def sanitize_html(html: str) -> str:
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=LINK_SCHEMES,
        link_rel=LINK_REL,
        # A link opens in a new tab, so following one never loses a half-done ranking.
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )


def markdown_to_safe_html(text: str, *, links: bool = True) -> str:
    """Render Markdown from an untrusted source into HTML that is safe to insert as-is.

    With `links=False` (blind A/B) a link stays visible Markdown text: a URL
    can name its source, and nothing in a blind comparison may be followed.
    """
    renderer = _markdown() if links else _markdown_without_links()
    return sanitize_html(renderer.render(text or ""))


def completion_text_key(text: str) -> str:
    """What makes two completions the same text: equal after NFC and trimming the ends.

    Tasks never show two completions with one key, and builds never pair them
    (a preference between one text and itself is noise). The key drops only
    what a person cannot see on the page: surrounding whitespace, which the
    Markdown rendering above discards, and the byte form of a character (NFC
    and NFD "é" look alike). It keeps case, punctuation and inner spacing:
    those are differences someone may prefer, and code blocks show spacing.
    """
    return unicodedata.normalize("NFC", text).strip()
