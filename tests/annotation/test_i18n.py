"""Every string a person reads exists in Korean, and the page follows the person's language."""

from __future__ import annotations

import shutil
from pathlib import Path

import polib
import pytest
from django.conf import settings
from django.core.management import call_command

LOCALE = Path(settings.BASE_DIR) / "annotation" / "locale"
IGNORE = [".venv", "var", "tests", "bench", "node_modules", "static/vendor"]


SOURCE_DIRS = ["annotation", "training", "templates", "static", "config"]


@pytest.mark.parametrize("domain", ["django", "djangojs"])
def test_the_korean_catalog_translates_every_string_in_the_source(tmp_path, monkeypatch, domain):
    # given a copy of the source and its catalog (makemessages writes next to
    # the code it scans, so it must never run on the real tree from a test)
    for name in SOURCE_DIRS:
        shutil.copytree(
            Path(settings.BASE_DIR) / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(settings, "LOCALE_PATHS", [tmp_path / "annotation" / "locale"])

    # when it is refreshed from the source code as `makemessages` would
    call_command(
        "makemessages", locale=["ko"], domain=domain, ignore_patterns=IGNORE, no_obsolete=True, verbosity=0
    )

    # then nothing is untranslated or fuzzy (a new string without a translation fails here)
    catalog = polib.pofile(str(tmp_path / "annotation" / "locale" / "ko" / "LC_MESSAGES" / f"{domain}.po"))
    assert catalog.untranslated_entries() == []
    assert catalog.fuzzy_entries() == []


@pytest.mark.parametrize("domain", ["django", "djangojs"])
def test_the_compiled_catalog_matches_its_source(domain):
    source = polib.pofile(str(LOCALE / "ko" / "LC_MESSAGES" / f"{domain}.po"))
    compiled = polib.mofile(str(LOCALE / "ko" / "LC_MESSAGES" / f"{domain}.mo"))

    def entries(catalog):  # type: ignore[no-untyped-def]
        return {(e.msgid, e.msgstr or tuple(sorted(e.msgstr_plural.items()))) for e in catalog if e.msgid}

    assert entries(source) == entries(compiled), "run `python manage.py compilemessages`"


@pytest.mark.django_db
def test_a_korean_browser_gets_korean_pages(client):
    response = client.get("/accounts/login/", HTTP_ACCEPT_LANGUAGE="ko-KR,ko;q=0.9")
    assert "로그인" in response.content.decode()
    assert response["Content-Language"] == "ko"


@pytest.mark.django_db
def test_a_person_can_choose_their_language(client):
    response = client.post("/i18n/setlang/", {"language": "ko", "next": "/accounts/login/"}, follow=True)
    assert "로그인" in response.content.decode()
    english = client.post("/i18n/setlang/", {"language": "en", "next": "/accounts/login/"}, follow=True)
    assert "Sign in" in english.content.decode()
