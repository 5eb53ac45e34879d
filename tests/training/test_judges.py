"""Model judges: a reward model labels a project's tasks like a person; builds choose whether to read it.

The worker test runs the whole path: the manager attaches a judge on the
project's judges page → a scoring job (gpu queue, the real scoring process)
writes the scores → the judge's run (default queue) claims and submits
through the same services as people → builds keep or leave out its votes as
their `sources` option says.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from rest_framework.test import APIClient

from annotation.models import Comparison, CompletionScore, Judgment, Project, Source, Task, TaskCompletion
from annotation.roles import Role
from tests.annotation.conftest import add_member, make_people
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from tests.training.test_generation import reward_model_dir  # noqa: F401  (a session fixture)
from tests.training.test_scoring import reward_model_of, signed_in
from training.judges import judge_attach, judge_calibration, judge_ranks
from training.models import DatasetBuild, Judge, ScoringJob
from training.services import dataset_build_create

TIMEOUT_S = 180
worker_test = pytest.mark.django_db(transaction=True)


def wait_until(check: Any, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


# --- ranks from scores -----------------------------------------------------------------


class _Item:
    def __init__(self, completion_id: int, position: int) -> None:
        self.completion_id = completion_id
        self.position = position
        self.completion = type("C", (), {"uid": f"uid-{completion_id}"})()


def test_higher_scores_rank_better_and_equal_scores_tie_where_ties_are_allowed() -> None:
    items = [_Item(1, 0), _Item(2, 1), _Item(3, 2)]
    scores = {1: 0.1, 2: 0.9, 3: 0.9}
    assert judge_ranks(items=items, scores=scores, ties_allowed=True) == {"uid-2": 1, "uid-3": 1, "uid-1": 2}
    # without ties the display position breaks them
    assert judge_ranks(items=items, scores=scores, ties_allowed=False) == {"uid-2": 1, "uid-3": 2, "uid-1": 3}


# --- calibration ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_judges_agreement_is_measured_against_the_human_majority_on_the_pairs_both_judged() -> None:
    project = project_with_prompts(["One?", "Two?", "Three?"], name="calibrate", k=2, overlap=3)
    people = make_people(2, prefix="cal")
    model = user_with_roles(username="judge-account")
    first, second, third = tasks_of(project)
    # task 1: both people say A > B; the model agrees
    judge(first, people[0], [1, 2])
    judge(first, people[1], [1, 2])
    model_judgment = judge(first, model, [1, 2])
    # task 2: both people say A > B; the model says B > A
    judge(second, people[0], [1, 2])
    judge(second, people[1], [1, 2])
    model_judgment_2 = judge(second, model, [2, 1])
    # task 3: the people split (no majority), so it is not in the calibration set
    judge(third, people[0], [1, 2])
    judge(third, people[1], [2, 1])
    model_judgment_3 = judge(third, model, [1, 2])
    for judgment in (model_judgment, model_judgment_2, model_judgment_3):
        Judgment.objects.filter(pk=judgment.pk).update(source=Source.MODEL)
        Comparison.objects.filter(judgment=judgment).update(source=Source.MODEL)

    (row,) = judge_calibration(comparisons=Comparison.objects.filter(project=project))

    assert (row.user_id, row.pairs, row.agreed, row.agreement) == (model.pk, 2, 1, 0.5)


# --- attaching -------------------------------------------------------------------------


@pytest.fixture
def no_publish(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    published: list[int] = []
    monkeypatch.setattr("training.judges.judge_request", lambda *, judge_id: published.append(judge_id))
    return published


@pytest.mark.django_db
def test_a_judge_gets_its_own_labeler_account_that_cannot_sign_in(no_publish: list[int]) -> None:
    manager = user_with_roles(Role.MANAGER, username="judge-host")
    project = project_with_prompts(["Hi?"], name="attach", k=2)
    make_manager(project, manager)
    reward_model = reward_model_of(project, "/nowhere", name="rm-attach")

    judge_row = judge_attach(project=project, reward_model=reward_model, created_by=manager)

    account = judge_row.account
    assert not account.has_usable_password()
    assert project.memberships.filter(user=account, role=Role.LABELER).exists()
    with pytest.raises(ValidationError) as again:
        judge_attach(project=project, reward_model=reward_model, created_by=manager)
    assert "already judges" in str(again.value)


@pytest.mark.django_db
def test_only_the_projects_managers_attach_judges_with_reward_models_they_may_see(
    no_publish: list[int],
) -> None:
    owner = user_with_roles(Role.MANAGER, username="owner")
    other = user_with_roles(Role.MANAGER, username="other-manager")
    project = project_with_prompts(["Hi?"], name="mine", k=2)
    elsewhere = project_with_prompts(["Hey?"], name="theirs", k=2)
    make_manager(project, owner)
    make_manager(elsewhere, other)
    their_model = reward_model_of(elsewhere, "/nowhere", name="rm-theirs")

    with pytest.raises(ValidationError) as refused:
        judge_attach(project=project, reward_model=their_model, created_by=owner)
    assert set(refused.value.message_dict) == {"reward_model"}

    api = APIClient()
    api.force_authenticate(other)
    response = api.post(f"/api/projects/{project.pk}/judges", {"reward_model": their_model.pk}, format="json")
    assert response.status_code == 404
    client = Client()
    client.force_login(other)
    assert client.get(f"/projects/{project.pk}/judges").status_code == 404
    labeler = add_member(project, make_people(1, prefix="lab")[0])
    client.force_login(labeler)
    assert client.get(f"/projects/{project.pk}/judges").status_code in (403, 404)
    assert not Judge.objects.exists()


@pytest.mark.django_db
def test_the_api_attaches_a_judge_and_lists_it(
    no_publish: list[int], django_capture_on_commit_callbacks: Any
) -> None:
    manager = user_with_roles(Role.MANAGER, username="api-host")
    project = project_with_prompts(["Hi?"], name="api-judged", k=2)
    make_manager(project, manager)
    reward_model = reward_model_of(project, "/nowhere", name="rm-api")
    api = APIClient()
    api.force_authenticate(manager)

    with django_capture_on_commit_callbacks(execute=True):
        created = api.post(
            f"/api/projects/{project.pk}/judges", {"reward_model": reward_model.pk}, format="json"
        )
    bad = api.post(f"/api/projects/{project.pk}/judges", {"reward_model": 999999}, format="json")
    listed = api.get(f"/api/projects/{project.pk}/judges")

    assert created.status_code == 201, created.content
    assert created.json()["account"] == Judge.objects.get().account.username
    assert no_publish == [created.json()["id"]]
    assert bad.status_code == 400 and "reward_model" in bad.json()["errors"]
    assert [row["id"] for row in listed.json()] == [created.json()["id"]]


# --- the whole path through the workers ---------------------------------------------


def _human_majority_agreement(project: Project, scorer: str, human_ranks: list[int]) -> tuple[int, int]:
    """(pairs, agreed): the judge's outcome from the scores against the one person's ranks, pair by pair."""
    scores = dict(CompletionScore.objects.filter(scorer=scorer).values_list("completion_id", "score"))
    pairs = agreed = 0
    for task in Task.objects.filter(project=project):
        items = list(TaskCompletion.objects.filter(task=task).order_by("position"))
        for (i, a), (j, b) in itertools.combinations(enumerate(items), 2):
            human = (human_ranks[i] > human_ranks[j]) - (human_ranks[i] < human_ranks[j])
            model_a, model_b = scores[a.completion_id], scores[b.completion_id]
            model = (model_a < model_b) - (model_a > model_b)
            pairs += 1
            agreed += human == model
    return pairs, agreed


@worker_test
def test_a_judge_scores_ranks_and_its_votes_are_read_as_each_build_asks(
    celery_worker: str,
    reward_model_dir: Path,  # noqa: F811
    csrf_client: Client,
) -> None:
    # given a ranking project (two judgments per task) that one person has ranked in full
    manager = user_with_roles(Role.MANAGER, username="judged-host")
    project = project_with_prompts([f"Question {n}?" for n in range(5)], name="judged", k=3, overlap=2)
    make_manager(project, manager)
    person = add_member(project, make_people(1, prefix="ranker")[0])
    human_ranks = [1, 2, 3]
    for task in tasks_of(project):
        judge(task, person, human_ranks)
    reward_model = reward_model_of(project, reward_model_dir, name="rm-judge")

    # when the manager attaches the reward model as a judge on the project's judges page
    client, token = signed_in(csrf_client, manager)
    response = client.post(
        f"/projects/{project.pk}/judges", {"reward_model": reward_model.pk, "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    judge_row = Judge.objects.get(project=project)

    # then a scoring job writes the scores, and the judge takes the second slot of every task
    wait_until(
        lambda: Judgment.objects.filter(user=judge_row.account).count() == 5,
        "the judge judged every task",
    )
    job = ScoringJob.objects.get(project=project, reward_model=reward_model)
    assert job.status == ScoringJob.Status.SUCCEEDED
    judged = Judgment.objects.filter(user=judge_row.account)
    assert set(judged.values_list("source", flat=True)) == {Source.MODEL}
    assert set(Comparison.objects.filter(labeler=judge_row.account).values_list("source", flat=True)) == {
        Source.MODEL
    }
    assert set(Judgment.objects.filter(user=person).values_list("source", flat=True)) == {Source.HUMAN}
    assert all(task.judgment_count == 2 for task in tasks_of(project))
    judge_row.refresh_from_db()
    assert judge_row.judgments_made == 5

    # and its agreement with the person, on the page, is what the scores say
    pairs, agreed = _human_majority_agreement(project, job.scorer, human_ranks)
    page = client.get(f"/projects/{project.pk}/judges").content.decode()
    assert judge_row.account.username in page
    (calibration,) = judge_calibration(comparisons=Comparison.objects.filter(project=project))
    assert (calibration.pairs, calibration.agreed) == (pairs, agreed)

    # and builds read its votes as their sources option says
    human_pairs = Comparison.objects.filter(project=project, source=Source.HUMAN, is_tie=False).count()
    model_pairs = Comparison.objects.filter(project=project, source=Source.MODEL, is_tie=False).count()

    def built(sources: str, judge_agreement_min: float = 0.7) -> DatasetBuild:
        build = dataset_build_create(
            created_by=manager,
            name=f"judged {sources} {judge_agreement_min}",
            projects=[project],
            sources=sources,
            judge_agreement_min=judge_agreement_min,
            test_fraction=0.0,
        )
        wait_until(
            lambda: DatasetBuild.objects.get(pk=build.pk).status in DatasetBuild.FINISHED_STATUSES, "built"
        )
        build.refresh_from_db()
        assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
        return build

    def pair_rows(build: DatasetBuild) -> int:
        return sum(build.counts["pairs"].values())

    agreement = agreed / pairs
    humans_only = built(DatasetBuild.Sources.HUMANS)
    everyone = built(DatasetBuild.Sources.HUMANS_AND_MODELS)
    calibrated_out = built(
        DatasetBuild.Sources.CALIBRATED_MODELS, judge_agreement_min=min(1.0, agreement + 0.01)
    )
    assert pair_rows(humans_only) == human_pairs
    assert pair_rows(everyone) == human_pairs + model_pairs
    if agreement < 1.0:
        assert pair_rows(calibrated_out) == human_pairs
    calibrated_in = built(DatasetBuild.Sources.CALIBRATED_MODELS, judge_agreement_min=agreement)
    assert pair_rows(calibrated_in) == human_pairs + model_pairs
    (reported,) = calibrated_in.summary["model_judges"]["judges"]
    assert reported["kept"] and reported["agreement_with_humans"] == pytest.approx(agreement, abs=1e-4)
    assert reported["pairs_shared_with_humans"] == pairs
