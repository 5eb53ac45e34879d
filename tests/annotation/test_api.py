"""The JSON API as a client program uses it: token auth, CSRF-checked sessions, 404 for strangers."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    CompletionScore,
    Judgment,
    Policy,
    Project,
    Prompt,
)
from annotation.roles import Role
from tests.annotation.conftest import add_member, make_people


def token_client(user) -> APIClient:  # type: ignore[no-untyped-def]
    client = APIClient(enforce_csrf_checks=True)
    token, _created = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def ranks_in_display_order(assignment: dict) -> dict[str, int]:
    return {completion["id"]: rank for rank, completion in enumerate(assignment["completions"], start=1)}


@pytest.fixture
def team(make_project):  # type: ignore[no-untyped-def]
    project = make_project(tasks=3, k=3, overlap=1, flags=["harmful"])
    boss, alice, bob, stranger, other_boss = make_people(5)
    add_member(project, boss, Role.MANAGER)
    add_member(project, alice, Role.LABELER)
    add_member(project, bob, Role.LABELER)
    other = Project.objects.create(name="someone else's", k=2)
    add_member(other, other_boss, Role.MANAGER)
    return {
        "project": project,
        "manager": boss,
        "alice": alice,
        "bob": bob,
        "outsider": stranger,
        "other_manager": other_boss,
    }


@pytest.mark.django_db
def test_a_labeler_claims_and_ranks_through_the_api(team):
    # given a labeler with a token
    client = token_client(team["alice"])
    project = team["project"]

    # when she claims a task
    claimed = client.post(f"/api/projects/{project.pk}/next")

    # then she sees the prompt and K completions by opaque id and letter, never by policy
    assert claimed.status_code == 200
    body = claimed.json()
    assert [c["label"] for c in body["completions"]] == ["A", "B", "C"]
    assert "policy" not in json.dumps(body)
    assert body["settings"] == {
        "kind": "ranking",
        "k": 3,
        "ties_allowed": True,
        "likert_enabled": False,
        "flags": ["harmful"],
        "rationale_required": False,
    }

    # when she submits a ranking with a tie, and her client retries the same request
    answer = {"ranks": ranks_in_display_order(body), "client_token": "abc-1", "active_seconds": 12.5}
    first_id = body["completions"][0]["id"]
    answer["ranks"][body["completions"][1]["id"]] = 1
    answer["flags"] = {first_id: ["harmful"]}
    stored = client.post(f"/api/assignments/{body['id']}/judgment", answer, format="json")
    retried = client.post(f"/api/assignments/{body['id']}/judgment", answer, format="json")

    # then one judgment with C(3,2) comparisons is stored, the retry says so
    assert stored.status_code == 201, stored.json()
    assert stored.json()["comparisons"] == math.comb(3, 2)
    assert retried.status_code == 200 and retried.json()["created"] is False
    judgment = Judgment.objects.get()
    assert judgment.flags == {first_id: ["harmful"]}
    assert Comparison.objects.filter(judgment=judgment, is_tie=True).count() == 1


@pytest.mark.django_db
def test_claim_says_204_when_nothing_is_left(team):
    client = token_client(team["alice"])
    project = team["project"]
    for index in range(3):
        body = client.post(f"/api/projects/{project.pk}/next").json()
        answer = {"ranks": ranks_in_display_order(body), "client_token": f"t{index}"}
        assert (
            client.post(f"/api/assignments/{body['id']}/judgment", answer, format="json").status_code == 201
        )
    assert client.post(f"/api/projects/{project.pk}/next").status_code == 204


@pytest.mark.django_db
def test_an_answer_after_a_takeover_gets_409_with_the_answer_echoed(team):
    # given alice's lease ran out and bob took the task over
    project = team["project"]
    Project.objects.filter(pk=project.pk).update(overlap=1)
    alice, bob = token_client(team["alice"]), token_client(team["bob"])
    held = alice.post(f"/api/projects/{project.pk}/next").json()
    Assignment.objects.filter(pk=held["id"]).update(lease_expires_at=timezone.now() - timedelta(minutes=1))
    for _ in range(3):  # bob works through the project until he holds alice's task
        taken = bob.post(f"/api/projects/{project.pk}/next").json()
        if Assignment.objects.get(pk=taken["id"]).task_id == Assignment.objects.get(pk=held["id"]).task_id:
            break
        answer = {"ranks": ranks_in_display_order(taken), "client_token": f"b{taken['id']}"}
        bob.post(f"/api/assignments/{taken['id']}/judgment", answer, format="json")

    # when alice submits
    answer = {"ranks": ranks_in_display_order(held), "client_token": "late-1", "rationale": "A is clearest"}
    response = alice.post(f"/api/assignments/{held['id']}/judgment", answer, format="json")

    # then she is told what happened and gets her answer back; nothing of hers is stored
    assert response.status_code == 409
    assert response.json()["reason"] == "taken_over"
    assert response.json()["your_answer"]["ranks"] == answer["ranks"]
    assert response.json()["your_answer"]["rationale"] == "A is clearest"
    assert not Judgment.objects.filter(user=team["alice"]).exists()


@pytest.mark.django_db
def test_an_invalid_answer_gets_400_naming_the_field(team):
    client = token_client(team["alice"])
    body = client.post(f"/api/projects/{team['project'].pk}/next").json()
    ranks = ranks_in_display_order(body)
    ranks.popitem()
    response = client.post(
        f"/api/assignments/{body['id']}/judgment", {"ranks": ranks, "client_token": "x"}, format="json"
    )
    assert response.status_code == 400
    assert "ranks" in response.json()["errors"]
    assert Judgment.objects.count() == 0


@pytest.mark.django_db
def test_skip_releases_the_task(team):
    client = token_client(team["alice"])
    body = client.post(f"/api/projects/{team['project'].pk}/next").json()
    response = client.post(f"/api/assignments/{body['id']}/skip", {"reason": "unreadable"}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "skipped"
    assert client.post(f"/api/projects/{team['project'].pk}/next").json()["id"] != body["id"]


def _object_urls(team) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    project = team["project"]
    assignment = token_client(team["alice"]).post(f"/api/projects/{project.pk}/next").json()
    return [
        ("get", f"/api/projects/{project.pk}/"),
        ("post", f"/api/projects/{project.pk}/next"),
        ("post", f"/api/projects/{project.pk}/import"),
        ("get", f"/api/projects/{project.pk}/stats"),
        ("get", f"/api/projects/{project.pk}/judgments"),
        ("post", f"/api/assignments/{assignment['id']}/judgment"),
        ("post", f"/api/assignments/{assignment['id']}/skip"),
    ]


def _database_state() -> tuple[int, ...]:
    return (
        Assignment.objects.count(),
        Assignment.objects.filter(status="active").count(),
        Judgment.objects.count(),
        Prompt.objects.count(),
        Policy.objects.count(),
    )


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["outsider", "other_manager"])
def test_people_outside_the_project_get_404_on_every_object_url(team, who):
    urls = _object_urls(team)
    before = _database_state()
    client = token_client(team[who])
    for method, url in urls:
        response = getattr(client, method)(url, {}, format="json")
        assert response.status_code == 404, (method, url, response.status_code)
    visible = [project["name"] for project in client.get("/api/projects/").json()["results"]]
    assert visible == ([] if who == "outsider" else ["someone else's"])
    assert _database_state() == before


@pytest.mark.django_db
def test_anonymous_callers_are_refused_everywhere(team):
    urls = _object_urls(team)
    before = _database_state()
    client = APIClient(enforce_csrf_checks=True)
    for method, url in [*urls, ("get", "/api/projects/")]:
        assert getattr(client, method)(url, {}, format="json").status_code == 401, url
    assert _database_state() == before


@pytest.mark.django_db
def test_a_labeler_cannot_call_manager_endpoints_or_touch_another_labelers_assignment(team):
    project = team["project"]
    alice, bob = token_client(team["alice"]), token_client(team["bob"])
    held = alice.post(f"/api/projects/{project.pk}/next").json()
    upload = SimpleUploadedFile("p.jsonl", b'{"prompt": "hi"}\n')
    assert (
        bob.post(f"/api/projects/{project.pk}/import", {"file": upload}, format="multipart").status_code
        == 404
    )
    assert bob.get(f"/api/projects/{project.pk}/stats").status_code == 404
    assert bob.get(f"/api/projects/{project.pk}/judgments").status_code == 404
    answer = {"ranks": ranks_in_display_order(held), "client_token": "bob-1"}
    assert bob.post(f"/api/assignments/{held['id']}/judgment", answer, format="json").status_code == 404
    assert bob.post(f"/api/assignments/{held['id']}/skip").status_code == 404
    # and a manager who is no labeler cannot claim
    assert token_client(team["manager"]).post(f"/api/projects/{project.pk}/next").status_code == 404
    assert Judgment.objects.count() == 0


@pytest.mark.django_db
def test_session_clients_must_send_the_csrf_token(team):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(team["alice"])
    assert client.post(f"/api/projects/{team['project'].pk}/next").status_code == 403
    assert Assignment.objects.count() == 0


@pytest.mark.django_db
def test_a_manager_imports_reads_stats_and_exports_judgments(team):
    project = team["project"]
    manager = token_client(team["manager"])
    lines = [
        {
            "id": "new-1",
            "prompt": "What is 2+2?",
            "completions": [
                {"text": "4", "policy": "sft"},
                {"text": "5", "policy": "base"},
                {"text": "four", "policy": "dpo"},
            ],
        },
        {"id": "new-2", "prompt": [{"role": "user", "content": "Say hi"}]},
    ]
    upload = SimpleUploadedFile("p.jsonl", "\n".join(json.dumps(line) for line in lines).encode())
    imported = manager.post(f"/api/projects/{project.pk}/import", {"file": upload}, format="multipart")
    assert imported.status_code == 201, imported.json()
    assert imported.json()["prompts_created"] == 2
    assert imported.json()["tasks_created"] == 1

    bad = SimpleUploadedFile("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": 3}\nnot json\n')
    refused = manager.post(f"/api/projects/{project.pk}/import", {"file": bad}, format="multipart")
    assert refused.status_code == 400
    assert [error["line"] for error in refused.json()["lines"]] == [2, 3]
    assert refused["Content-Type"] == "application/problem+json"
    assert Prompt.objects.filter(project=project).count() == 3 + 2

    alice = token_client(team["alice"])
    body = alice.post(f"/api/projects/{project.pk}/next").json()
    alice.post(
        f"/api/assignments/{body['id']}/judgment",
        {"ranks": ranks_in_display_order(body), "client_token": "s1"},
        format="json",
    )
    stats = manager.get(f"/api/projects/{project.pk}/stats").json()
    assert stats["progress"]["judgments_total"] == 1

    export = manager.get(f"/api/projects/{project.pk}/judgments")
    assert export.status_code == 200
    assert export["Content-Disposition"].startswith("attachment;")
    rows = [json.loads(line) for line in b"".join(export.streaming_content).decode().splitlines()]
    assert len(rows) == 1
    assert rows[0]["labeler"] == team["alice"].username
    assert sorted(c["rank"] for c in rows[0]["completions"]) == [1, 2, 3]
    assert all(c["scores"] == {} for c in rows[0]["completions"])


@pytest.mark.django_db
def test_the_judgment_export_carries_each_completions_scores(team):
    # given a judged task whose completions a reward model scored
    project = team["project"]
    alice = token_client(team["alice"])
    body = alice.post(f"/api/projects/{project.pk}/next").json()
    alice.post(
        f"/api/assignments/{body['id']}/judgment",
        {"ranks": ranks_in_display_order(body), "client_token": "s1"},
        format="json",
    )
    uids = [completion["id"] for completion in body["completions"]]
    for value, uid in enumerate(uids):
        CompletionScore.objects.create(
            completion=Completion.objects.get(uid=uid), scorer="reward model: rm", score=value / 2
        )

    # when the manager exports the judgments
    export = token_client(team["manager"]).get(f"/api/projects/{project.pk}/judgments")
    row = json.loads(b"".join(export.streaming_content).decode())

    # then each completion carries its score under the scorer's label
    assert {c["id"]: c["scores"] for c in row["completions"]} == {
        uid: {"reward model: rm": value / 2} for value, uid in enumerate(uids)
    }


@pytest.mark.django_db
def test_the_openapi_schema_describes_the_endpoints(client):
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    assert "/api/projects/{project_id}/next" in paths
    assert "/api/assignments/{assignment_id}/judgment" in paths
    assert "409" in paths["/api/assignments/{assignment_id}/judgment"]["post"]["responses"]


# Statements one claim and one submit send, counted with the savepoint pair the
# service's transaction becomes inside a test. A claim: token, project and role,
# the lease already held, the locked task with its prompt, its slots, its
# completions, the insert. A submit: token, assignment, the locked task and its
# project, the client token, the completions, the lease's compare-and-set, the
# judgment, its comparisons in one insert, the task's count, the project's
# webhooks (an event's deliveries are written in the submit's transaction).
CLAIM_QUERIES = 7 + 2
SUBMIT_QUERIES = 10 + 2


@pytest.mark.django_db
def test_a_claim_and_a_submit_each_cost_a_fixed_number_of_queries(team, django_assert_max_num_queries):
    # given a labeler who has already ranked one task (a session under way)
    client = token_client(team["alice"])
    project = team["project"]
    first = client.post(f"/api/projects/{project.pk}/next").json()
    answer = {"ranks": ranks_in_display_order(first), "client_token": "warm-1"}
    assert client.post(f"/api/assignments/{first['id']}/judgment", answer, format="json").status_code == 201

    # when she claims the next task and submits it
    with django_assert_max_num_queries(CLAIM_QUERIES):
        claimed = client.post(f"/api/projects/{project.pk}/next")
    body = claimed.json()
    answer = {"ranks": ranks_in_display_order(body), "client_token": "next-1"}
    with django_assert_max_num_queries(SUBMIT_QUERIES):
        stored = client.post(f"/api/assignments/{body['id']}/judgment", answer, format="json")

    # then both did their whole job within that budget
    assert claimed.status_code == 200 and len(body["completions"]) == 3
    assert body["prompt"]["text"] and all(c["text"] for c in body["completions"])
    assert stored.status_code == 201 and stored.json()["comparisons"] == math.comb(3, 2)
    assert Assignment.objects.get(pk=body["id"]).status == Assignment.Status.SUBMITTED


@pytest.mark.django_db
def test_claiming_again_while_holding_a_lease_returns_it_whole_at_no_extra_cost(
    team, django_assert_max_num_queries
):
    client = token_client(team["alice"])
    project = team["project"]
    held = client.post(f"/api/projects/{project.pk}/next").json()
    # token, project and role, the lease held, its task and prompt, its completions; the savepoints
    with django_assert_max_num_queries(5 + 2):
        again = client.post(f"/api/projects/{project.pk}/next").json()
    assert again == held


@pytest.mark.django_db
def test_only_the_judging_role_of_the_projects_kind_may_claim(team):
    # given a ranking project and an A/B session
    project = team["project"]
    session = Project.objects.create(name="a/b", kind=Project.Kind.AB, k=2)
    both, evaluator = make_people(2, prefix="judge")
    add_member(project, both, Role.LABELER)
    add_member(project, both, Role.EVALUATOR)
    add_member(session, both, Role.LABELER)
    add_member(session, evaluator, Role.EVALUATOR)
    root = get_user_model().objects.create_superuser("root", "root@example.com", None)

    # then ranking is for labelers and A/B voting for evaluators, whatever else a person holds
    assert token_client(both).post(f"/api/projects/{project.pk}/next").status_code == 200
    assert token_client(both).post(f"/api/projects/{session.pk}/next").status_code == 404
    assert token_client(evaluator).post(f"/api/projects/{session.pk}/next").status_code == 204  # no tasks
    assert token_client(evaluator).post(f"/api/projects/{project.pk}/next").status_code == 404
    # a superuser sees every project but judges only where they hold the role
    assert token_client(root).get(f"/api/projects/{project.pk}/").status_code == 200
    assert token_client(root).post(f"/api/projects/{project.pk}/next").status_code == 404
    assert token_client(team["alice"]).post("/api/projects/99999/next").status_code == 404


@pytest.mark.django_db
def test_a_skip_answers_with_the_assignment_in_a_fixed_number_of_queries(team, django_assert_max_num_queries):
    client = token_client(team["alice"])
    held = client.post(f"/api/projects/{team['project'].pk}/next").json()
    # token, assignment, the compare-and-set, the row read back with task, project and prompt, its completions
    with django_assert_max_num_queries(5):
        skipped = client.post(f"/api/assignments/{held['id']}/skip", {"reason": "unreadable"}, format="json")
    assert skipped.status_code == 200
    assert skipped.json() == {**held, "status": "skipped"}
