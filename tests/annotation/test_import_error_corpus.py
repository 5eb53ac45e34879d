"""The import's error messages for a fixed corpus of lines, held against a recording.

`import_error_corpus.jsonl` holds 714 lines: the random lines of the import's
property tests (tests/annotation/test_import.py, drawn derandomized), then one
line for each rule of the format. `import_error_corpus_expected.json` is what
the hand-written validator that came before the pydantic model of a line
(annotation.import_format) reported for them: every message, with its line and
field, in order. A change to the format's rules changes this recording on
purpose; a change to how the rules are written must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from annotation.importing import ImportValidationError, prompts_import
from annotation.models import Project, Prompt

HERE = Path(__file__).parent


@pytest.mark.django_db
def test_the_corpus_gets_the_recorded_messages_line_by_line() -> None:
    # given the corpus and the messages recorded for it
    data = (HERE / "import_error_corpus.jsonl").read_bytes()
    expected = json.loads((HERE / "import_error_corpus_expected.json").read_text())
    project = Project.objects.create(name="corpus", k=2)

    # when it is imported
    with pytest.raises(ImportValidationError) as raised:
        prompts_import(project=project, data=data)

    # then each line gets the same messages, naming the same fields, in the same order; nothing is written
    messages = [str(error) for error in raised.value.errors]
    assert len(messages) == len(expected)
    for got, recorded in zip(messages, expected, strict=True):
        assert got == recorded
    assert Prompt.objects.count() == 0
