"""The JSON Lines import of prompts and their completions (annotation.importing)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotation.forms import PromptImportForm
from annotation.importing import (
    ImportError_,
    ImportValidationError,
    prompt_content_hash,
    prompts_import,
)
from annotation.models import Completion, Policy, Project, Prompt, Task

pytestmark = pytest.mark.django_db

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
]


@pytest.fixture
def project(db: None) -> Project:
    return Project.objects.create(name="Helpfulness", k=2)


def jsonl(*lines: Any) -> bytes:
    """Objects become JSON lines; strings are taken as raw lines."""
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def row_counts() -> tuple[int, int, int, int]:
    return (Prompt.objects.count(), Completion.objects.count(), Policy.objects.count(), Task.objects.count())


def import_errors(project: Project, data: bytes) -> list[str]:
    """The problems an import reports, as printed; fails the test if the import succeeds."""
    with pytest.raises(ImportValidationError) as raised:
        prompts_import(project=project, data=data)
    return [str(error) for error in raised.value.errors]


# --- a good file ---------------------------------------------------------------


def test_a_valid_file_with_text_and_chat_prompts_imports_fully(project: Project) -> None:
    # given a file with a text prompt, a chat prompt, completions from two policies and metadata
    data = jsonl(
        {
            "id": "q1",
            "prompt": "What is 2 + 2?",
            "completions": [{"text": "4", "policy": "sft-v1"}, {"text": "Four.", "policy": "sft-v2"}],
            "metadata": {"source": "arith", "difficulty": 1},
        },
        "",
        {"id": 2, "prompt": CHAT, "completions": [{"text": "7", "policy": "sft-v1"}]},
        {"prompt": "Say hi."},
    )

    # when it is imported
    report = prompts_import(project=project, data=data)

    # then every prompt, completion and policy is there
    assert (report.prompts_created, report.completions_created, report.policies_created) == (3, 3, 2)
    assert report.duplicates == []
    assert set(Policy.objects.values_list("name", "kind")) == {("sft-v1", "imported"), ("sft-v2", "imported")}
    text_prompt = Prompt.objects.get(external_id="q1")
    assert (text_prompt.project, text_prompt.text, text_prompt.messages) == (project, "What is 2 + 2?", None)
    assert text_prompt.metadata == {"source": "arith", "difficulty": 1}
    assert text_prompt.content_hash == prompt_content_hash("What is 2 + 2?")
    assert [(c.policy.name, c.text) for c in text_prompt.completions.order_by("id")] == [
        ("sft-v1", "4"),
        ("sft-v2", "Four."),
    ]
    chat_prompt = Prompt.objects.get(external_id="2")
    assert (chat_prompt.text, chat_prompt.messages, chat_prompt.is_chat) == ("", CHAT, True)
    assert Prompt.objects.get(text="Say hi.").external_id == ""


def test_it_makes_tasks_for_prompts_with_enough_completions(project: Project) -> None:
    # given a K=2 project and one prompt with two completions and one with a single completion
    data = jsonl(
        {"prompt": "a", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": "q"}]},
        {"prompt": "b", "completions": [{"text": "x", "policy": "p"}]},
    )

    # when imported
    report = prompts_import(project=project, data=data)

    # then the task builder made a task for the first only
    assert report.tasks_created == 1
    assert list(Task.objects.values_list("prompt__text", flat=True)) == ["a"]


def test_gold_ranks_are_stored_on_the_prompt_in_completion_order(project: Project) -> None:
    data = jsonl(
        {
            "prompt": "Which is better?",
            "completions": [
                {"text": "meh", "policy": "p", "gold_rank": 2},
                {"text": "great", "policy": "q", "gold_rank": 1},
                {"text": "bad", "policy": "r", "gold_rank": 3},
            ],
            "metadata": {"topic": "taste"},
        }
    )

    prompts_import(project=project, data=data)

    prompt = Prompt.objects.get()
    assert prompt.metadata == {"topic": "taste", "gold_ranks": [2, 1, 3]}
    assert list(prompt.completions.order_by("id").values_list("text", flat=True)) == ["meh", "great", "bad"]
    gold_task = Task.objects.get(prompt=prompt)
    assert gold_task.is_gold


def test_a_policy_of_another_kind_with_the_same_name_is_used_as_it_is(project: Project) -> None:
    model_policy = Policy.objects.create(name="sft-v1", kind=Policy.Kind.MODEL, base_model="demo/tiny")
    model_policy.projects.add(project)

    report = prompts_import(
        project=project, data=jsonl({"prompt": "a", "completions": [{"text": "x", "policy": "sft-v1"}]})
    )

    assert report.policies_created == 0
    assert Completion.objects.get().policy == model_policy
    assert Policy.objects.get().kind == Policy.Kind.MODEL


def test_imported_sources_join_the_project_and_another_projects_model_is_not_taken_over(
    project: Project,
) -> None:
    # given a model policy of another project
    elsewhere = Project.objects.create(name="elsewhere")
    theirs = Policy.objects.create(name="their-sft", kind=Policy.Kind.MODEL, base_model="/models/theirs")
    theirs.projects.add(elsewhere)

    # when an import names it, nothing is written and the error says why
    with pytest.raises(ImportValidationError) as refused:
        prompts_import(
            project=project,
            data=jsonl({"prompt": "a", "completions": [{"text": "x", "policy": "their-sft"}]}),
        )
    assert "a model policy this project does not have" in str(refused.value.errors[0])
    assert not Prompt.objects.exists() and list(theirs.projects.all()) == [elsewhere]

    # and an imported source named in the file becomes one of the project's policies
    prompts_import(
        project=project, data=jsonl({"prompt": "a", "completions": [{"text": "x", "policy": "gpt"}]})
    )
    assert list(Policy.objects.get(name="gpt").projects.all()) == [project]


def test_it_reads_a_binary_stream_and_reports_progress_in_lines(project: Project) -> None:
    lines = [{"prompt": f"question {number}"} for number in range(2500)]
    progress: list[int] = []

    report = prompts_import(project=project, data=io.BytesIO(jsonl(*lines)), progress=progress.append)

    assert report.prompts_created == 2500
    assert sum(progress) == 2500
    assert len(progress) > 1


def test_it_reads_an_uploaded_file(project: Project) -> None:
    upload = SimpleUploadedFile("prompts.jsonl", jsonl({"prompt": "a"}, {"prompt": "b"}))

    report = prompts_import(project=project, data=upload)

    assert report.prompts_created == 2


def test_blank_lines_are_ignored_and_a_byte_order_mark_is_accepted(project: Project) -> None:
    data = b"\xef\xbb\xbf" + jsonl({"prompt": "a"}, "", "   ", {"prompt": {"not": "valid"}}) + b"\r\n\n"

    errors = import_errors(project, data)

    assert len(errors) == 1
    assert errors[0].startswith("line 4: prompt: must be a non-empty string or a list")


def test_prompt_content_hash_ignores_key_order_and_tells_text_from_chat() -> None:
    reordered = [{"content": message["content"], "role": message["role"]} for message in CHAT]

    assert prompt_content_hash(CHAT) == prompt_content_hash(reordered)
    assert prompt_content_hash("hi") != prompt_content_hash([{"role": "user", "content": "hi"}])
    assert len(prompt_content_hash("hi")) == 64


# --- bad lines -----------------------------------------------------------------


def test_a_file_with_three_bad_lines_reports_every_one_and_writes_nothing(project: Project) -> None:
    # given good lines around three bad ones
    data = jsonl(
        {"prompt": "good 1", "completions": [{"text": "x", "policy": "p"}]},
        {"prompt": ""},
        {"prompt": "good 2"},
        {"prompt": "good 3", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": ""}]},
        {"prompt": "good 4", "colour": "blue"},
    )
    before = row_counts()

    # when it is imported
    errors = import_errors(project, data)

    # then each bad line is named with its field, and nothing was written
    assert errors == [
        "line 2: prompt: must not be empty",
        "line 4: completions[1].policy: must be a non-empty string",
        "line 5: colour: unknown field; a line has id, prompt, completions, metadata",
    ]
    assert row_counts() == before


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"id": 1}, "line 1: prompt: is required"),
        (
            {"prompt": 5},
            "line 1: prompt: must be a non-empty string or a list of {role, content} messages, "
            "not an integer",
        ),
        ({"prompt": []}, "line 1: prompt: must have at least one message"),
        ({"prompt": ["hi"]}, "line 1: prompt[0]: must be an object {role, content}, not a string"),
        (
            {"prompt": [{"role": "robot", "content": "hi"}]},
            'line 1: prompt[0].role: must be one of system, user, assistant, not "robot"',
        ),
        (
            {"prompt": [{"role": "user", "content": " "}]},
            "line 1: prompt[0].content: must be a non-empty string",
        ),
        ({"prompt": [{"role": "user"}]}, "line 1: prompt[0].content: is required"),
        (
            {"prompt": [{"role": "user", "content": "hi", "name": "x"}]},
            "line 1: prompt[0].name: unknown field",
        ),
        (
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "line 1: prompt[1].role: the last turn must be from the user, not assistant",
        ),
        ({"prompt": "a", "completions": {}}, "line 1: completions: must be an array, not an object"),
        (
            {"prompt": "a", "completions": [7]},
            "line 1: completions[0]: must be an object {text, policy}, not an integer",
        ),
        (
            {"prompt": "a", "completions": [{"policy": "p"}]},
            "line 1: completions[0].text: must be a non-empty string",
        ),
        (
            {"prompt": "a", "completions": [{"text": "x", "policy": "p" * 201}]},
            "line 1: completions[0].policy: must be at most 200 characters",
        ),
        (
            {"prompt": "a", "completions": [{"text": "x", "policy": "p", "score": 1}]},
            "line 1: completions[0].score: unknown field",
        ),
        (
            {
                "prompt": "a",
                "completions": [{"text": "x", "policy": "p", "gold_rank": 1}, {"text": "y", "policy": "p"}],
            },
            "line 1: completions[1].gold_rank: is required: other completions of this line have a gold_rank",
        ),
        (
            {
                "prompt": "a",
                "completions": [
                    {"text": "x", "policy": "p", "gold_rank": 1},
                    {"text": "y", "policy": "p", "gold_rank": 3},
                ],
            },
            "line 1: completions[1].gold_rank: must be between 1 and 2 (1 = best), not 3",
        ),
        (
            {
                "prompt": "a",
                "completions": [
                    {"text": "x", "policy": "p", "gold_rank": True},
                    {"text": "y", "policy": "p", "gold_rank": 1},
                ],
            },
            "line 1: completions[0].gold_rank: must be an integer, not a boolean",
        ),
        (
            {"prompt": "a", "completions": [{"text": "x", "policy": "p", "gold_rank": 1}]},
            "line 1: completions: a gold ranking needs at least 2 completions",
        ),
        ({"prompt": "a", "metadata": [1]}, "line 1: metadata: must be an object, not an array"),
        (
            {"prompt": "a", "metadata": {"gold_ranks": [1]}},
            "line 1: metadata.gold_ranks: is reserved for the import",
        ),
        ({"prompt": "a", "id": True}, "line 1: id: must be a string or an integer, not a boolean"),
        ({"prompt": "a", "id": ""}, "line 1: id: must not be empty"),
        ({"prompt": "a", "id": "x" * 201}, "line 1: id: must be at most 200 characters"),
    ],
)
def test_each_problem_names_the_line_and_the_field(
    project: Project, line: dict[str, Any], expected: str
) -> None:
    errors = import_errors(project, jsonl(line))

    assert any(error.startswith(expected) for error in errors), errors


def test_an_id_repeated_within_the_file_is_an_error(project: Project) -> None:
    data = jsonl({"id": "q", "prompt": "a"}, {"id": "q", "prompt": "b"})

    assert import_errors(project, data) == ['line 2: id: "q" is already used on line 1']


def test_an_id_used_in_the_project_by_another_prompt_is_an_error(project: Project) -> None:
    prompts_import(project=project, data=jsonl({"id": 7, "prompt": "first"}))
    existing = Prompt.objects.get()

    errors = import_errors(project, jsonl({"prompt": "fine"}, {"id": "7", "prompt": "second"}))

    assert errors == [f'line 2: id: "7" is already used in this project by prompt {existing.pk}']
    assert Prompt.objects.count() == 1


def test_the_error_lists_every_problem_when_printed(project: Project) -> None:
    error = ImportValidationError(
        [ImportError_(3, "prompt", "is required"), ImportError_(None, "", "too big")]
    )

    assert (
        str(error)
        == "2 problems in the import; nothing was imported:\nline 3: prompt: is required\nfile: too big"
    )


# --- duplicates --------------------------------------------------------------


def test_duplicates_within_the_file_are_reported_and_skipped(project: Project) -> None:
    # given the same text prompt twice and the same chat prompt with its keys in another order
    data = jsonl(
        {"prompt": "same"},
        {"prompt": CHAT},
        {"prompt": "same", "completions": [{"text": "x", "policy": "p"}]},
        {"prompt": [{"content": m["content"], "role": m["role"]} for m in CHAT]},
    )

    # when imported
    report = prompts_import(project=project, data=data)

    # then the later copies are listed by line and not written
    assert report.prompts_created == 2
    assert report.completions_created == 0
    assert report.duplicates == [(3, "same prompt as line 1; skipped"), (4, "same prompt as line 2; skipped")]
    assert Prompt.objects.count() == 2


def test_duplicates_of_prompts_already_in_the_project_are_reported_and_skipped(project: Project) -> None:
    # given a project that already holds a prompt, and another project with the same prompt
    prompts_import(project=project, data=jsonl({"id": "old", "prompt": "kept"}))
    existing = Prompt.objects.get()
    other = Project.objects.create(name="Other", k=2)
    prompts_import(project=other, data=jsonl({"prompt": "new"}))

    # when a file repeating it is imported
    report = prompts_import(project=project, data=jsonl({"prompt": "new"}, {"id": "old", "prompt": "kept"}))

    # then the repeat is skipped and named; the prompt of the other project does not count
    assert report.prompts_created == 1
    assert report.duplicates == [
        (2, f'same prompt as prompt {existing.pk} (id "old") in the project; skipped')
    ]
    assert project.prompts.count() == 2


def test_importing_the_same_file_twice_adds_nothing_the_second_time(project: Project) -> None:
    data = jsonl(
        {"id": 1, "prompt": "a", "completions": [{"text": "x", "policy": "p"}]}, {"id": 2, "prompt": CHAT}
    )
    prompts_import(project=project, data=data)
    before = row_counts()

    report = prompts_import(project=project, data=data)

    assert (report.prompts_created, report.completions_created, len(report.duplicates)) == (0, 0, 2)
    assert row_counts() == before


# --- limits ------------------------------------------------------------------


@override_settings(IMPORT_MAX_BYTES=100)
def test_a_file_over_the_size_limit_is_rejected(project: Project) -> None:
    data = jsonl(*({"prompt": f"question {number}"} for number in range(10)))

    errors = import_errors(project, data)

    assert errors == [
        "file: the file is larger than the 100 bytes limit (IMPORT_MAX_BYTES); split it into smaller files"
    ]
    assert Prompt.objects.count() == 0


@override_settings(IMPORT_MAX_LINE_BYTES=40)
def test_a_line_over_the_length_limit_is_rejected_and_the_next_lines_still_read(project: Project) -> None:
    data = jsonl({"prompt": "short"}, {"prompt": "x" * 100}, {"prompt": ""}, {"prompt": "y" * 26})

    errors = import_errors(project, data)

    assert errors == [
        "line 2: the line is longer than the 40 bytes limit (IMPORT_MAX_LINE_BYTES)",
        "line 3: prompt: must not be empty",
    ]


@override_settings(IMPORT_MAX_DEPTH=3)
def test_nesting_deeper_than_the_limit_is_rejected(project: Project) -> None:
    data = jsonl({"prompt": "a", "metadata": {"b": {"c": 1}}}, {"prompt": "b", "metadata": {"b": {"c": {}}}})

    errors = import_errors(project, data)

    assert errors == [
        "line 2: metadata.b.c: nested too deeply: more than 3 levels of arrays and objects (IMPORT_MAX_DEPTH)"
    ]


def test_nesting_too_deep_for_the_parser_is_an_error_not_a_crash(project: Project) -> None:
    data = b'{"prompt": "a", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    errors = import_errors(project, data)

    assert len(errors) == 1
    assert errors[0].startswith("line 1: nested too deeply")


@override_settings(IMPORT_MAX_LINES=3)
def test_a_file_with_more_lines_than_the_limit_is_rejected(project: Project) -> None:
    data = jsonl({"prompt": "a"}, "", {"prompt": "b"}, {"prompt": "c"}, {"prompt": "d"})

    errors = import_errors(project, data)

    assert errors == [
        "line 5: the file has more than 3 prompt lines, the limit (IMPORT_MAX_LINES); "
        "split it into smaller files"
    ]


@override_settings(IMPORT_MAX_COMPLETIONS_PER_PROMPT=2)
def test_more_completions_than_the_limit_are_rejected(project: Project) -> None:
    completions = [{"text": str(number), "policy": "p"} for number in range(3)]

    errors = import_errors(project, jsonl({"prompt": "a", "completions": completions}))

    assert errors == [
        "line 1: completions: has 3 completions; the limit is 2 (IMPORT_MAX_COMPLETIONS_PER_PROMPT)"
    ]


# --- bytes that are not good JSON Lines -------------------------------------------


@pytest.mark.parametrize(
    ("raw_line", "expected"),
    [
        (
            b'{"prompt": "caf\xe9"}',
            "line 2: is not valid UTF-8 (byte 0xe9 at byte 16); save the file as UTF-8",
        ),
        (
            b'{"prompt": "a",}',
            "line 2: is not valid JSON: Expecting property name enclosed in double quotes (column 16)",
        ),
        (b'{"prompt": "a"} {"prompt": "b"}', "line 2: is not valid JSON: Extra data (column 17)"),
        (b'["prompt", "a"]', 'line 2: must be a JSON object {"prompt": …}, not an array'),
        (b'"just a string"', 'line 2: must be a JSON object {"prompt": …}, not a string'),
        (b'{"prompt": "a", "metadata": {"score": NaN}}', "line 2: is not accepted JSON: NaN is not allowed"),
        (
            b'{"prompt": "a", "metadata": {"score": -Infinity}}',
            "line 2: is not accepted JSON: -Infinity is not allowed",
        ),
        (
            b'{"prompt": "a", "metadata": {"score": 1e999}}',
            "line 2: is not accepted JSON: the number 1e999 is too large",
        ),
        (
            b'{"prompt": "a", "prompt": "b"}',
            'line 2: is not accepted JSON: the key "prompt" appears twice in one object',
        ),
        (b'{"prompt": "a\\u0000b"}', "line 2: prompt: contains a NUL character"),
        (
            b'{"prompt": "a", "metadata": {"k\\u0000": 1}}',
            'line 2: metadata."k\\u0000": the key contains a NUL character',
        ),
        (
            b'{"prompt": "a", "completions": [{"text": "\\u0000", "policy": "p"}]}',
            "line 2: completions[0].text: contains a NUL character",
        ),
        (b'{"prompt": "\\ud800"}', "line 2: prompt: contains an unpaired surrogate"),
        (b'{"prompt": "a", "id": ' + b"9" * 5000 + b"}", "line 2: is not valid JSON: Exceeds the limit"),
    ],
)
def test_lines_that_are_not_good_json_get_a_clear_error_naming_the_line(
    project: Project, raw_line: bytes, expected: str
) -> None:
    data = jsonl({"prompt": "fine"}) + b"\n" + raw_line + b"\n" + jsonl({"prompt": "also fine"})

    errors = import_errors(project, data)

    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors
    assert Prompt.objects.count() == 0


# --- fuzzing: it fails only with ImportValidationError, and then writes nothing ---


@pytest.fixture
def project_with_a_prompt(project: Project) -> Project:
    """A project whose prompt and id the fuzzed lines may repeat."""
    prompts_import(project=project, data=jsonl({"id": "a", "prompt": "same", "completions": []}))
    return project


class _RolledBack(Exception):
    pass


def import_and_roll_back(project: Project, data: bytes) -> None:
    """Import `data`; on a validation error check nothing was written. Undo everything either way."""
    before = row_counts()
    try:
        with transaction.atomic():
            try:
                prompts_import(project=project, data=data)
            except ImportValidationError as error:
                assert error.errors
                assert row_counts() == before
            raise _RolledBack
    except _RolledBack:
        pass


any_text = st.one_of(
    st.sampled_from(["", " ", "hi", "same", "\x00", "\ud800", "user", "system", "assistant", "p"]),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=25,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "bot"]) | json_values, "content": any_text}
    )
    | json_values,
    max_size=3,
)
completions = st.lists(
    st.fixed_dictionaries(
        {"text": any_text, "policy": st.sampled_from(["p", "q", ""]) | json_values},
        optional={"gold_rank": st.integers(min_value=-1, max_value=4) | json_values},
    )
    | json_values,
    max_size=4,
)
import_shaped_lines = st.fixed_dictionaries(
    {"prompt": any_text | messages},
    optional={
        "id": st.sampled_from(["a", "b", 1, 2]) | json_values,
        "completions": completions,
        "metadata": json_values,
        "extra": json_values,
    },
)


# Lines that pass, so the fuzzing also reaches the writes: duplicates, shared ids and policies, gold ranks.
good_text = st.sampled_from(["hi", "same", "Name a prime."]) | st.text(min_size=1, max_size=12).filter(
    lambda text: text.strip() and "\x00" not in text
)
good_lines = st.fixed_dictionaries(
    {
        "prompt": good_text
        | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": good_text}))
        .filter(bool)
        .map(lambda turns: [*turns[:-1], {"role": "user", "content": turns[-1]["content"]}])
    },
    optional={
        "id": st.sampled_from(["a", "b", 1, 2, "same"]),
        "completions": st.lists(
            st.fixed_dictionaries({"text": good_text, "policy": st.sampled_from(["p", "q", "sft-v1"])}),
            max_size=3,
        ),
        "metadata": st.dictionaries(st.sampled_from(["a", "b"]), st.integers() | good_text, max_size=2),
    },
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        values = draw(st.lists(good_lines, max_size=6))
    else:
        values = draw(st.lists(good_lines | import_shaped_lines | json_values, max_size=6))
    ensure_ascii = draw(st.booleans())
    text = "\n".join(json.dumps(value, ensure_ascii=ensure_ascii) for value in values)
    # Without ensure_ascii a lone surrogate is written as such: bytes that are not UTF-8.
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_any_bytes_import_or_fail_with_a_validation_error_writing_nothing(
    project: Project, data: bytes
) -> None:
    import_and_roll_back(project, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=jsonl_files())
def test_any_json_lines_import_or_fail_with_a_validation_error_writing_nothing(
    project_with_a_prompt: Project, data: bytes
) -> None:
    import_and_roll_back(project_with_a_prompt, data)


# --- the management command -------------------------------------------------------


def test_the_command_imports_a_file_and_prints_the_report(project: Project, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(
        jsonl(
            {"prompt": "a", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": "q"}]},
            {"prompt": "a"},
        )
    )
    stdout, stderr = io.StringIO(), io.StringIO()

    call_command("import_prompts", str(project.pk), str(path), stdout=stdout, stderr=stderr)

    assert stdout.getvalue().splitlines() == [
        "line 2: duplicate: same prompt as line 1; skipped",
        "imported into Helpfulness: 1 prompts, 2 completions, 2 new policies, 1 tasks; 1 duplicates skipped",
    ]
    assert "2/2" in stderr.getvalue()  # the progress bar
    assert Completion.objects.count() == 2


def test_the_command_finds_the_project_by_name_and_reads_standard_input(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(jsonl({"prompt": "from stdin"}))))
    stdout = io.StringIO()

    call_command("import_prompts", "Helpfulness", "-", stdout=stdout, stderr=io.StringIO())

    assert "1 prompts" in stdout.getvalue()
    assert Prompt.objects.get().text == "from stdin"


def test_the_command_prints_every_error_and_fails_having_written_nothing(
    project: Project, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(jsonl({"prompt": "good"}, {"prompt": ""}, "not json", {"prompt": "good too", "x": 1}))
    stderr = io.StringIO()

    with pytest.raises(CommandError, match="3 problems in the file; nothing was imported") as raised:
        call_command("import_prompts", project.name, str(path), stdout=io.StringIO(), stderr=stderr)

    assert raised.value.returncode == 1
    printed = stderr.getvalue()
    assert "line 2: prompt: must not be empty" in printed
    assert "line 3: is not valid JSON: Expecting value (column 1)" in printed
    assert "line 4: x: unknown field" in printed
    assert Prompt.objects.count() == 0


def test_the_command_rejects_an_unknown_project_and_a_missing_file(project: Project, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no project with the id or name 'Nope'"):
        call_command("import_prompts", "Nope", str(tmp_path / "x.jsonl"))
    with pytest.raises(CommandError, match="no such file"):
        call_command("import_prompts", project.name, str(tmp_path / "missing.jsonl"))


# --- the upload form ---------------------------------------------------------------


def test_the_upload_form_accepts_a_file_within_the_size_limit() -> None:
    form = PromptImportForm(files={"file": SimpleUploadedFile("p.jsonl", jsonl({"prompt": "a"}))})

    assert form.is_valid(), form.errors


@override_settings(IMPORT_MAX_BYTES=1024)
def test_the_upload_form_rejects_a_file_over_the_size_limit_with_a_clear_message() -> None:
    form = PromptImportForm(files={"file": SimpleUploadedFile("p.jsonl", b"x" * 2048)})

    assert not form.is_valid()
    assert form.errors["file"] == ["The file is 2 KiB; the limit is 1 KiB. Split it into smaller files."]


def test_a_completion_without_a_policy_is_told_what_to_add(project: Project) -> None:
    errors = import_errors(project, jsonl({"prompt": "a", "completions": [{"text": "x"}]}))

    assert any(
        error.startswith("line 1: completions[0].policy: missing: name the policy that wrote this completion")
        for error in errors
    ), errors


def test_the_report_names_each_prompt_left_without_a_task_and_why(project: Project) -> None:
    # given a K=2 project: one prompt with two texts, one with one completion, one whose two texts are equal
    data = jsonl(
        {"prompt": "a", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": "q"}]},
        {"prompt": "b", "completions": [{"text": "x", "policy": "p"}]},
        {"prompt": "c", "completions": [{"text": "same", "policy": "p"}, {"text": "same ", "policy": "q"}]},
        {"prompt": "d"},
    )

    report = prompts_import(project=project, data=data)

    assert report.without_task == [
        (2, "1 completion; a task needs K=2"),
        (3, "one text in all 2 completions: nothing to rank"),
        (4, "no completions yet"),
    ]


def test_the_admin_says_which_lines_were_duplicates_and_which_got_no_task(client, project: Project) -> None:
    from annotation.roles import Role
    from tests.annotation.conftest import add_member
    from tests.factories import user_with_roles

    manager = add_member(project, user_with_roles(Role.MANAGER, username="importer"), Role.MANAGER)
    client.force_login(manager)
    data = jsonl(
        {"prompt": "a", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": "q"}]},
        {"prompt": "a", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": "q"}]},
        {"prompt": "b", "completions": [{"text": "x", "policy": "p"}]},
    )

    response = client.post(
        f"/admin/annotation/project/{project.pk}/import/",
        {"file": SimpleUploadedFile("p.jsonl", data)},
        follow=True,
    )

    shown = [str(message) for message in response.context["messages"]]
    assert any("line 2: same prompt as line 1" in message for message in shown), shown
    assert any("line 3: 1 completion; a task needs K=2" in message for message in shown), shown
