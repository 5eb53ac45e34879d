"""Task creation: which completions a task shows, and which prompts wait without a task."""

from __future__ import annotations

import json
import unicodedata

import pytest

from annotation.importing import prompts_import
from annotation.models import Completion, Policy, Project, Prompt, Task
from annotation.rendering import completion_text_key
from annotation.roles import Role
from annotation.services import ab_session_create, tasks_create_for_project
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db


def jsonl(*lines: dict) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode()


def shown_texts(task: Task) -> list[str]:
    return [item.completion.text for item in task.items.select_related("completion").order_by("position")]


def prompt_with(project: Project, texts: list[str], *, metadata: dict | None = None) -> Prompt:
    prompt = Prompt.objects.create(
        project=project,
        text=f"Question {Prompt.objects.count()}?",
        content_hash=f"q{Prompt.objects.count()}",
        metadata=metadata or {},
    )
    for index, text in enumerate(texts):
        policy, _ = Policy.objects.get_or_create(name=f"policy-{index}")
        Completion.objects.create(prompt=prompt, policy=policy, text=text)
    return prompt


def test_a_prompt_with_fewer_than_k_different_texts_gets_a_smaller_task_and_one_text_gets_none() -> None:
    # given a K=3 project: three texts, two texts among three completions, and one text three times
    project = Project.objects.create(name="capitals", k=3)
    data = jsonl(
        {
            "prompt": "Capital of France?",
            "completions": [
                {"text": "Paris.", "policy": "a"},
                {"text": "Paris.", "policy": "b"},
                {"text": "Lyon.", "policy": "c"},
            ],
        },
        {
            "prompt": "Capital of Italy?",
            "completions": [
                {"text": "Rome.", "policy": "a"},
                {"text": "Milan.", "policy": "b"},
                {"text": "Turin.", "policy": "c"},
            ],
        },
        {
            "prompt": "Capital of Spain?",
            "completions": [
                {"text": "Madrid.", "policy": "a"},
                {"text": "Madrid.", "policy": "b"},
                {"text": " Madrid.", "policy": "c"},
            ],
        },
    )

    # when it is imported
    report = prompts_import(project=project, data=data)

    # then France gets a task of its two different texts, Italy one of three, Spain none (nothing to rank)
    assert report.tasks_created == 2
    shown = {
        task.prompt.text: sorted(item.completion.text for item in task.items.all())
        for task in Task.objects.select_related("prompt").prefetch_related("items__completion")
    }
    assert shown == {
        "Capital of France?": ["Lyon.", "Paris."],
        "Capital of Italy?": ["Milan.", "Rome.", "Turin."],
    }
    assert report.repeated_texts == [3]


def test_a_task_takes_different_texts_while_spreading_over_policies() -> None:
    # given four completions from four policies, the first two with the same text
    project = Project.objects.create(name="capitals", k=3)
    prompt_with(project, ["Paris.", "Paris.", "Lyon.", "Nice."])

    # when tasks are made
    assert tasks_create_for_project(project=project) == 1

    # then the task shows three different texts
    assert shown_texts(Task.objects.get()) == ["Paris.", "Lyon.", "Nice."]


def test_a_task_never_shows_one_text_twice_even_when_one_policy_wrote_the_others() -> None:
    # given two policies: one wrote the same text twice, the other one more text
    project = Project.objects.create(name="capitals", k=3)
    prompt = prompt_with(project, ["Paris.", "Lyon."])
    first = Policy.objects.get(name="policy-0")
    Completion.objects.create(prompt=prompt, policy=first, text="Paris.")
    Completion.objects.create(prompt=prompt, policy=first, text="Nice.")

    tasks_create_for_project(project=project)

    assert sorted(shown_texts(Task.objects.get())) == ["Lyon.", "Nice.", "Paris."]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Paris.", "Paris.\n"),
        ("  Paris.", "Paris."),
        (unicodedata.normalize("NFC", "Café."), unicodedata.normalize("NFD", "Café.")),
    ],
)
def test_texts_that_differ_only_in_what_a_page_cannot_show_are_the_same_text(first: str, second: str) -> None:
    assert first != second
    assert completion_text_key(first) == completion_text_key(second)
    project = Project.objects.create(name="capitals", k=2)
    prompt_with(project, [first, second])

    assert tasks_create_for_project(project=project) == 0


@pytest.mark.parametrize(("first", "second"), [("Paris.", "paris."), ("Paris.", "Paris!"), ("a b", "a  b")])
def test_texts_a_person_can_tell_apart_are_different_texts(first: str, second: str) -> None:
    assert completion_text_key(first) != completion_text_key(second)
    project = Project.objects.create(name="capitals", k=2)
    prompt_with(project, [first, second])

    assert tasks_create_for_project(project=project) == 1


def test_a_gold_prompt_whose_ranked_completions_repeat_a_text_gets_no_task() -> None:
    project = Project.objects.create(name="capitals", k=3)
    prompt_with(project, ["Paris.", "Paris.", "Lyon."], metadata={"gold_ranks": [1, 2, 3]})
    prompt_with(project, ["Rome.", "Milan.", "Turin."], metadata={"gold_ranks": [1, 2, 3]})

    assert tasks_create_for_project(project=project) == 1
    task = Task.objects.get()
    assert (task.is_gold, shown_texts(task)) == (True, ["Rome.", "Milan.", "Turin."])


def test_an_ab_session_leaves_out_prompts_where_both_policies_wrote_the_same_text() -> None:
    # given two policies that agree word for word on the first prompt only
    source = Project.objects.create(name="source", k=2)
    same = prompt_with(source, ["Paris.", "Paris."])
    different = prompt_with(source, ["Rome.", "Milan."])
    policies = list(Policy.objects.order_by("name"))
    host = user_with_roles(Role.MANAGER, username="host")

    # when a session compares them on both prompts
    session = ab_session_create(
        name="blind", policies=policies, prompts=[same, different], votes_per_pair=1, created_by=host
    )

    # then only the prompt whose outputs differ is judged
    tasks = list(session.tasks.all())
    assert len(tasks) == 1
    assert sorted(shown_texts(tasks[0])) == ["Milan.", "Rome."]
