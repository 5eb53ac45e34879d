"""Template filters for untrusted text. Every model output goes through `markdown`."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString, mark_safe

from annotation.rendering import markdown_to_safe_html

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> SafeString:
    # Safe because markdown_to_safe_html escapes raw HTML and sanitizes the result.
    return mark_safe(markdown_to_safe_html(str(text)))  # noqa: S308


@register.filter(name="markdown_inert")
def markdown_inert_filter(text: str) -> SafeString:
    """Markdown for blind comparisons: links and images stay text."""
    return mark_safe(markdown_to_safe_html(str(text), links=False))  # noqa: S308


@register.filter(name="rank_letter")
def rank_letter(index: int) -> str:
    """0 -> A, 1 -> B, …: the display label of a card."""
    return chr(ord("A") + int(index))


@register.filter(name="percent")
def percent(fraction: float | None) -> str:
    """0.456 -> '46%'; None -> '–'."""
    if fraction is None:
        return "–"
    return f"{float(fraction) * 100:.0f}%"


@register.filter(name="get_item")
def get_item(mapping: dict, key: str) -> object:
    """mapping[key], or None: for tables whose columns are only known at run time."""
    return mapping.get(key) if isinstance(mapping, dict) else None
