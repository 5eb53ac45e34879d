"""Korean reaches every page and form a manager sees: no literal English in a template, no English label.

`test_i18n.py` checks that every string *marked* for translation has a Korean
one. These tests find the strings nobody marked: text written straight into a
template, and form labels, help texts and choices that Django derives from a
field's name (`learning_rate` → "Learning rate") and never translates.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from django import forms
from django.conf import settings
from django.forms.utils import pretty_name
from django.template.base import Lexer, TokenType
from django.utils import translation

TEMPLATES = Path(settings.BASE_DIR) / "templates"
# Modules whose forms people fill in on the manager pages or in the admin: every
# `forms`, `admin` and `*views` module of both apps (a new one is covered at once).
FORM_MODULE_SUFFIXES = ("forms", "admin", "views")
# Forms Django ships with their own translations, and forms no person fills in.
FORMS_NOT_OURS = {"PasswordResetForOneAccount"}

# Words that read the same in Korean: names, units, formats and acronyms.
SAME_IN_KOREAN = {
    "Rankwise", "Markdown", "JSON", "JSONL", "Parquet", "API", "URL", "ID", "id", "K", "GPU", "GPUs",
    "CPU", "SFT", "DPO", "RL", "RLOO", "GRPO", "LoRA", "IA3", "PEFT", "TRL", "KL", "HF", "vLLM",
    "DDP", "FSDP", "DeepSpeed", "Swagger", "UI", "Redoc", "OpenAPI", "A", "B", "A/B", "Elo", "Bradley", "Terry",
    "Bradley–Terry", "Dawid", "Skene", "Dawid–Skene", "Likert", "Kendall", "Krippendorff", "Hugging", "Face",
    "Ctrl", "Enter", "Esc", "Tab", "Shift", "SHA256", "HMAC", "UTC", "README", "md", "txt", "bf16", "fp16",
    "fp32", "top", "Top", "RewardTrainer", "DPOTrainer", "p", "n", "x", "e", "g", "true", "false", "AUC", "ROC", "CSV", "UUID", "best", "of", "ms", "s",
}  # fmt: skip
# Single letters are keys and response names (A, B, C…), not words.
WORD = re.compile(r"[A-Za-z][A-Za-z0-9]+(?:['’][a-z]+)?")
PLACEHOLDER = "\x00"
FILTER_TEXT_ARGUMENT = re.compile(r"\|\s*(?:default|default_if_none|yesno)\s*:\s*[\"']([^\"']*)[\"']")
# A block filled with a name (`{% block app_id %}ab-app{% endblock %}`) is an identifier, not text.
IDENTIFIER = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)+$")
TEXT_BETWEEN_TAGS = re.compile(r"[^<>]+(?=<|$)")
VISIBLE_ATTRIBUTE = re.compile(r"""\b(?:title|placeholder|aria-label|alt)\s*=\s*(["'])(.*?)\1""", re.S)
HIDDEN_BLOCKS = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
ENTITY = re.compile(r"&[a-zA-Z]+;|&#\d+;")


def english_words(text: str) -> list[str]:
    """The words of `text` a Korean reader would see in English."""
    text = ENTITY.sub(" ", text)
    return [word for word in WORD.findall(text) if word not in SAME_IN_KOREAN]


# --- templates ---------------------------------------------------------------------


def template_paths() -> list[Path]:
    # Mail texts and the admin's own templates are Django's (translated by Django) or not pages.
    return sorted(
        path for path in TEMPLATES.rglob("*.html") if "registration/password_reset_email" not in str(path)
    )


def literal_text(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of what a template shows as written: outside translate tags, comments and scripts.

    Every template tag and variable becomes a placeholder, so an HTML tag
    with a `{% url %}` inside stays whole; then text between HTML tags counts,
    and of the tags' attributes only those people read (title, placeholder,
    aria-label, alt).
    """
    depth = 0  # inside {% blocktranslate %} … {% endblocktranslate %} or {% comment %} … {% endcomment %}
    parts = []
    for token in Lexer(source).tokenize():
        kept_lines = "\n" * token.contents.count("\n")
        if token.token_type == TokenType.BLOCK:
            name = token.contents.split()[0] if token.contents else ""
            if name in ("blocktranslate", "blocktrans", "comment"):
                depth += 1
            elif name in ("endblocktranslate", "endblocktrans", "endcomment"):
                depth -= 1
            parts.append(PLACEHOLDER + kept_lines)
        elif token.token_type == TokenType.TEXT and not depth:
            parts.append(token.contents)
        elif token.token_type == TokenType.VAR and not depth:
            # A filter's text argument is shown as written: {{ when|default:"never" }}.
            for argument in FILTER_TEXT_ARGUMENT.findall(token.contents):
                yield token.lineno, argument
            parts.append(PLACEHOLDER + kept_lines)
        else:
            parts.append(PLACEHOLDER + kept_lines)
    page = HIDDEN_BLOCKS.sub(lambda m: "\n" * m.group(0).count("\n"), "".join(parts))

    def line_of(position: int) -> int:
        return page.count("\n", 0, position) + 1

    for match in VISIBLE_ATTRIBUTE.finditer(page):
        yield line_of(match.start()), match.group(2)
    for match in TEXT_BETWEEN_TAGS.finditer(page):
        first = line_of(match.start())
        for offset, text in enumerate(match.group(0).split("\n")):
            if not IDENTIFIER.match(text.strip(" \t" + PLACEHOLDER)):
                yield first + offset, text


def untranslated_template_text() -> list[str]:
    problems = []
    for path in template_paths():
        for line, text in literal_text(path.read_text()):
            words = english_words(text)
            if words:
                problems.append(f"{path.relative_to(TEMPLATES)}:{line}: {' '.join(words)!r}")
    return problems


def test_no_template_shows_english_text_outside_a_translate_tag():
    problems = untranslated_template_text()
    assert not problems, (
        "wrap these in {% translate %} (and translate them in annotation/locale):\n" + "\n".join(problems)
    )


def test_the_template_check_catches_a_literal_word_and_spares_translated_ones():
    source = (
        '{% load i18n %}<h1>{% translate "Runs" %}</h1><p title="Learning rate">Epochs</p>'
        "{% blocktranslate %}Some {{ n }} text{% endblocktranslate %}{# a note #}"
        "{% comment %}Not shown{% endcomment %}<script>var x = 1;</script>{{ when|default:'never' }}"
        '<a href="{% url "home" %}">{{ name }}</a> · JSONL'
    )
    found = [words for _line, text in literal_text(source) if (words := english_words(text))]
    assert sorted(found) == [["Epochs"], ["Learning", "rate"], ["never"]]


# --- forms -------------------------------------------------------------------------


def form_modules() -> list[str]:
    names = []
    for package_name in ("annotation", "training"):
        package = importlib.import_module(package_name)
        names += [
            f"{package_name}.{module.name}"
            for module in pkgutil.iter_modules(package.__path__)
            if module.name.endswith(FORM_MODULE_SUFFIXES)
        ]
    return sorted(names)


def form_classes() -> list[type[forms.BaseForm]]:
    found: dict[str, type[forms.BaseForm]] = {}
    for module_name in form_modules():
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, forms.BaseForm)
                and value.__module__ == module_name
                and name not in FORMS_NOT_OURS
            ):
                found[f"{module_name}.{name}"] = value
    return [found[key] for key in sorted(found)]


def field_texts(form_class: type[forms.BaseForm]) -> dict[str, str]:
    """Label, help text and choice labels of every field, as a person reads them now."""
    texts = {}
    for name, field in form_class.base_fields.items():
        if isinstance(field.widget, forms.HiddenInput):
            continue
        label = field.label if field.label is not None else pretty_name(name)
        texts[f"{name}.label"] = str(label)
        if field.help_text:
            texts[f"{name}.help_text"] = str(field.help_text)
        for value, choice in getattr(field, "choices", None) or []:
            if isinstance(choice, (list, tuple)):  # an option group
                continue
            if str(value) == str(choice):
                continue  # a value shown as itself (a number, a name): data, not text
            texts[f"{name}.choice.{value}"] = str(choice)
    return texts


@pytest.mark.django_db
@pytest.mark.parametrize("form_class", form_classes(), ids=lambda form: f"{form.__module__}.{form.__name__}")
def test_every_form_field_reads_in_korean(form_class):
    with translation.override("en"):
        english = field_texts(form_class)
    with translation.override("ko"):
        korean = field_texts(form_class)

    untranslated = {
        key: text
        for key, text in korean.items()
        if text == english[key] and english_words(text) and not key.endswith(".choice.")
    }
    assert not untranslated, f"English in {form_class.__name__} under Korean: {untranslated}"
