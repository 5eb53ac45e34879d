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

from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    CompletionScore,
    Judgment,
    Policy,
    Project,
    Source,
    Task,
    TaskCompletion,
)
from annotation.roles import Role
from annotation.services import assignment_claim_next
from tests.annotation.conftest import add_member, make_people
from tests.factories import user_with_roles
from tests.training.child_here import run_child_here
from tests.training.modern_models import FAMILIES, modern_model_dirs  # noqa: F401  (a session fixture)
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from tests.training.test_generation import reward_model_dir  # noqa: F401  (a session fixture)
from tests.training.test_scoring import reward_model_of, signed_in
from training.judge_process import (
    DEFAULT_TEMPLATE,
    judge_job_run,
    judge_prompt_render,
    prompt_as_text,
    rotations,
    template_problems,
    verdict_from_readings,
)
from training.judges import (
    JudgeJobEvents,
    judge_attach,
    judge_calibration,
    judge_job_create,
    judge_job_finish,
    judge_job_spec,
    judge_job_write_batch,
    judge_ranks,
    judge_run,
    judge_work,
)
from training.models import DatasetBuild, Judge, JudgeJob, JudgeVerdict, ScoringJob
from training.services import dataset_build_create
from training.services.jobs import job_claim

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


# --- a causal LM prompted to rank --------------------------------------------------------


def test_a_template_must_hold_the_prompt_and_the_candidates_and_nothing_unknown() -> None:
    assert template_problems(DEFAULT_TEMPLATE) == []
    assert template_problems("Which is best?\n{prompt}\n{candidates}\nAnswer ({labels}, {count}):") == []
    (missing,) = template_problems("Which is best? {prompt}")
    assert "{candidates}" in missing
    unknown = template_problems("{prompt} {candidates} {answer}")
    assert unknown and "{answer}" in unknown[0]
    (broken,) = template_problems("{prompt} {candidates} {")
    assert "braces" in broken
    assert template_problems("Braces {{like this}} stay: {prompt} {candidates}") == []


def test_each_response_is_read_under_every_label_and_unreadable_readings_say_why() -> None:
    orders = rotations(3)
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    # a judge that always names label A best prefers a position, not a response: nothing to read
    always_a = [[1.0, 0.0, 0.0]] * 3
    no_preference = verdict_from_readings(always_a, orders)
    assert isinstance(no_preference, str) and "prefers no response" in no_preference
    # a judge that leans to label A: once positions are balanced, what is left is its preference
    leaning = [[0.5, 0.2, 0.3], [0.6, 0.1, 0.3], [0.7, 0.2, 0.1]]
    assert verdict_from_readings(leaning, orders) == pytest.approx([1.0 / 3, 0.9 / 3, 1.1 / 3])
    # a judge that always names response 1 best, whatever its label
    prefers_1 = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert verdict_from_readings(prefers_1, orders) == pytest.approx([0.0, 1.0, 0.0])
    unreadable = verdict_from_readings([[float("nan"), 0.5, 0.5], *always_a[1:]], orders)
    assert isinstance(unreadable, str) and "not numbers" in unreadable


def test_the_rendered_prompt_labels_the_responses_in_the_order_given() -> None:
    rendered = judge_prompt_render(
        "Q: {prompt}\n{candidates}\nBest of {count} ({labels}):", prompt="2+2?", candidates=["4", "5"]
    )
    assert rendered == "Q: 2+2?\nResponse A:\n4\n\nResponse B:\n5\nBest of 2 (A, B):"
    assert prompt_as_text(text="", messages=[{"role": "user", "content": "Hi"}]) == "User: Hi"


def _lm_project(name: str, *, prompts: int = 3, k: int = 3, **fields: Any) -> Project:
    return project_with_prompts([f"What is {n} plus {n}?" for n in range(prompts)], name=name, k=k, **fields)


@pytest.mark.django_db
def test_a_bad_template_is_refused_with_a_clear_error_on_the_page_and_in_the_api(
    no_publish: list[int], csrf_client: Client, tiny_model_dir: Path
) -> None:
    manager = user_with_roles(Role.MANAGER, username="lm-host")
    project = _lm_project("lm-refused")
    make_manager(project, manager)
    policy = Policy.objects.create(
        name="lm-judge-policy", kind=Policy.Kind.MODEL, base_model=str(tiny_model_dir)
    )
    policy.projects.add(project)

    with pytest.raises(ValidationError) as refused:
        judge_attach(project=project, policy=policy, prompt_template="Rank: {prompt}", created_by=manager)
    assert set(refused.value.message_dict) == {"prompt_template"}

    client, token = signed_in(csrf_client, manager)
    page = client.post(
        f"/projects/{project.pk}/judges",
        {"policy": policy.pk, "prompt_template": "Which is best? {candidates}", "csrfmiddlewaretoken": token},
    )
    assert page.status_code == 400
    assert "{prompt}" in page.content.decode()

    api = APIClient()
    api.force_authenticate(manager)
    response = api.post(
        f"/api/projects/{project.pk}/judges",
        {"policy": policy.pk, "prompt_template": "{prompt} {candidates} {verdict}"},
        format="json",
    )
    assert response.status_code == 400 and "{verdict}" in str(response.json()["errors"]["prompt_template"])
    both = api.post(
        f"/api/projects/{project.pk}/judges", {"policy": policy.pk, "base_model": "x/y"}, format="json"
    )
    assert both.status_code == 400
    assert not Judge.objects.exists() and no_publish == []


@pytest.mark.django_db
def test_the_api_and_the_page_attach_a_language_model_judge_from_a_base_model_or_a_policy(
    no_publish: list[int], csrf_client: Client, tiny_model_dir: Path, django_capture_on_commit_callbacks: Any
) -> None:
    manager = user_with_roles(Role.MANAGER, username="lm-api-host")
    project = _lm_project("lm-api")
    make_manager(project, manager)
    api = APIClient()
    api.force_authenticate(manager)

    with django_capture_on_commit_callbacks(execute=True):
        created = api.post(
            f"/api/projects/{project.pk}/judges", {"base_model": str(tiny_model_dir)}, format="json"
        )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["kind"] == Judge.Kind.LANGUAGE_MODEL and body["reward_model"] is None
    assert body["prompt_template"] == DEFAULT_TEMPLATE and body["answers_unreadable"] == 0
    policy = Policy.objects.get(pk=body["policy"])
    assert policy.kind == Policy.Kind.MODEL and project in policy.projects.all()
    assert no_publish == [body["id"]]

    # the same policy cannot judge twice; another project's manager sees nothing
    again = api.post(f"/api/projects/{project.pk}/judges", {"policy": policy.pk}, format="json")
    assert again.status_code == 400

    second = _lm_project("lm-page")
    make_manager(second, manager)
    client, token = signed_in(csrf_client, manager)
    response = client.post(
        f"/projects/{second.pk}/judges",
        {
            "policy": policy.pk,
            "prompt_template": "{prompt}\n{candidates}\nBest:",
            "csrfmiddlewaretoken": token,
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    judge_row = Judge.objects.get(project=second)
    assert judge_row.prompt_template == "{prompt}\n{candidates}\nBest:"
    assert policy.name in client.get(f"/projects/{second.pk}/judges").content.decode()


def _read_here(judge_row: Judge) -> JudgeJob:
    """The judge's job, claimed and run in this process (the real child loop and the fenced writes)."""
    job = judge_job_create(judge=judge_row)
    claimed = job_claim(JudgeJob, job_id=job.pk)
    assert claimed is not None
    outcome = run_child_here(
        JudgeJobEvents(job_id=job.pk, attempt=claimed.attempts),
        judge_job_run,
        judge_job_spec(job=claimed),
        judge_work(judge=judge_row),
    )
    assert outcome == "succeeded"
    job.refresh_from_db()
    return job


@pytest.mark.django_db
@pytest.mark.parametrize("family", ["plain", *FAMILIES])
def test_a_language_model_reads_every_open_task_with_or_without_a_chat_template(
    family: str,
    no_publish: list[int],
    tiny_model_dir: Path,
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    # given a project, half of it chat prompts, and a tiny model as its judge
    model_dir = tiny_model_dir if family == "plain" else modern_model_dirs[family]
    project = project_with_prompts(
        [
            "What is 2 plus 2?",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        ],
        name=f"lm-read-{family}",
        k=3,
        ties_allowed=False,
    )
    # the plain model reads plain text (its tokenizer has a chat template, which it is told not to use)
    policy = Policy.objects.create(
        name=f"lm-{family}",
        kind=Policy.Kind.MODEL,
        base_model=str(model_dir),
        generation_settings={"prompt_format": "text"} if family == "plain" else {},
    )
    judge_row = judge_attach(project=project, policy=policy, created_by=None)

    # when its job reads the tasks and the judge runs
    job = _read_here(judge_row)
    outcome = judge_run(judge_id=judge_row.pk)

    # then every task has a verdict: a probability per response, summing to one
    assert job.status == JudgeJob.Status.SUCCEEDED and job.tasks_done == job.tasks_total == 2
    for verdict in JudgeVerdict.objects.filter(judge=judge_row):
        assert verdict.scores is not None and len(verdict.scores) == 3
        assert sum(verdict.scores.values()) == pytest.approx(1.0, abs=1e-4)
    # and the judge submitted one ranking per task as a model, ranked by the verdict
    assert outcome == "2 judgments"
    judgments = Judgment.objects.filter(user=judge_row.account)
    assert judgments.count() == 2
    assert set(judgments.values_list("source", flat=True)) == {Source.MODEL}
    for judgment in judgments:
        verdict = JudgeVerdict.objects.get(judge=judge_row, task=judgment.task)
        best = max(verdict.scores, key=lambda pk: verdict.scores[pk])
        assert judgment.ranks[str(Completion.objects.get(pk=int(best)).uid)] == 1


@pytest.mark.django_db
def test_an_unreadable_answer_is_counted_and_its_task_skipped_never_ranked(
    no_publish: list[int], tiny_model_dir: Path
) -> None:
    project = _lm_project("lm-unreadable", prompts=2, k=2)
    policy = Policy.objects.create(
        name="lm-unreadable", kind=Policy.Kind.MODEL, base_model=str(tiny_model_dir)
    )
    judge_row = judge_attach(project=project, policy=policy, created_by=None)
    first, second = tasks_of(project)
    job = judge_job_create(judge=judge_row)
    claimed = job_claim(JudgeJob, job_id=job.pk)
    assert claimed is not None
    JudgeJob.objects.filter(pk=job.pk).update(tasks_total=2)
    items = list(TaskCompletion.objects.filter(task=second).order_by("position"))

    written = judge_job_write_batch(
        job_id=job.pk,
        attempt=claimed.attempts,
        verdicts={
            first.pk: {"note": "the model's label probabilities are not numbers: [nan, nan]"},
            second.pk: {"scores": {items[0].completion_id: 0.3, items[1].completion_id: 0.7}},
        },
    )
    judge_job_finish(job_id=job.pk, attempt=claimed.attempts)
    outcome = judge_run(judge_id=judge_row.pk)

    assert written == 2
    judge_row.refresh_from_db()
    assert judge_row.answers_unreadable == 1
    assert outcome == "1 judgments, 1 skipped"
    (judgment,) = Judgment.objects.filter(user=judge_row.account)
    assert judgment.task_id == second.pk
    assert judgment.ranks == {str(items[1].completion.uid): 1, str(items[0].completion.uid): 2}
    skipped = Assignment.objects.get(user=judge_row.account, task=first)
    assert skipped.status == Assignment.Status.SKIPPED and "could not be read" in skipped.skip_reason
    # a second reading of the same task (a retried attempt) is dropped, not counted again
    assert (
        judge_job_write_batch(job_id=job.pk, attempt=claimed.attempts, verdicts={first.pk: {"note": "x"}})
        is None
    )


@worker_test
def test_a_language_model_judge_reads_ranks_and_is_filtered_by_builds_through_the_workers(
    celery_worker: str, tiny_model_dir: Path, csrf_client: Client
) -> None:
    # given a ranking project (two judgments per task) that one person has ranked in full
    manager = user_with_roles(Role.MANAGER, username="lm-judged-host")
    project = _lm_project("lm-judged", prompts=3, k=3, overlap=2)
    make_manager(project, manager)
    person = add_member(project, make_people(1, prefix="lm-ranker")[0])
    for task in tasks_of(project):
        judge(task, person, [1, 2, 3])

    # when the manager attaches a tiny causal LM as a judge on the judges page
    client, token = signed_in(csrf_client, manager)
    response = client.post(
        f"/projects/{project.pk}/judges",
        {
            "base_model": str(tiny_model_dir),
            "prompt_template": DEFAULT_TEMPLATE,
            "csrfmiddlewaretoken": token,
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    judge_row = Judge.objects.get(project=project)

    # then its judge job (gpu queue, the real child) reads the tasks and the judge takes every second slot
    wait_until(
        lambda: Judgment.objects.filter(user=judge_row.account).count() == 3,
        "the language-model judge judged every task",
    )
    job = JudgeJob.objects.get(judge=judge_row)
    assert job.status == JudgeJob.Status.SUCCEEDED and job.tasks_done == 3
    assert set(Judgment.objects.filter(user=judge_row.account).values_list("source", flat=True)) == {
        Source.MODEL
    }
    assert set(Comparison.objects.filter(labeler=judge_row.account).values_list("source", flat=True)) == {
        Source.MODEL
    }
    assert judge_row.account.username in client.get(f"/projects/{project.pk}/judges").content.decode()

    # and builds read its votes as their sources option says
    human_pairs = Comparison.objects.filter(project=project, source=Source.HUMAN, is_tie=False).count()
    model_pairs = Comparison.objects.filter(project=project, source=Source.MODEL, is_tie=False).count()
    assert model_pairs > 0

    def pair_rows(sources: str) -> int:
        build = dataset_build_create(
            created_by=manager, name=f"lm {sources}", projects=[project], sources=sources, test_fraction=0.0
        )
        wait_until(
            lambda: DatasetBuild.objects.get(pk=build.pk).status in DatasetBuild.FINISHED_STATUSES, "built"
        )
        build.refresh_from_db()
        assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
        return sum(build.counts["pairs"].values())

    assert pair_rows(DatasetBuild.Sources.HUMANS) == human_pairs
    assert pair_rows(DatasetBuild.Sources.HUMANS_AND_MODELS) == human_pairs + model_pairs


@pytest.mark.django_db
def test_a_task_leased_to_the_judge_before_it_had_a_verdict_is_read_by_the_next_job(
    no_publish: list[int], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("training.judges.judge_job_enqueue", lambda *, job_id: True)
    project = _lm_project("lm-leased", prompts=1, k=2)
    policy = Policy.objects.create(name="lm-leased", kind=Policy.Kind.MODEL, base_model=str(tiny_model_dir))
    judge_row = judge_attach(project=project, policy=policy, created_by=None)
    (task,) = tasks_of(project)
    lease = assignment_claim_next(project=project, user=judge_row.account)
    assert lease is not None and lease.task_id == task.pk

    assert judge_run(judge_id=judge_row.pk) == "reading tasks"
    job = JudgeJob.objects.get(judge=judge_row)
    assert [item["task_id"] for item in judge_work(judge=judge_row)["tasks"]] == [task.pk]
    assert judge_run(judge_id=judge_row.pk) == "waiting for verdicts"
    JudgeJob.objects.filter(pk=job.pk).update(status=JudgeJob.Status.CANCELLED)


def test_the_judge_prompt_goes_through_the_chat_template_unless_the_policy_reads_plain_text(
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    from transformers import AutoTokenizer

    from training.judge_process import judge_input_ids, labels_pick

    tokenizer = AutoTokenizer.from_pretrained(modern_model_dirs["qwen2"])
    chat = tokenizer.decode(judge_input_ids(tokenizer, "Which is best?", prompt_format="auto"))
    plain = tokenizer.decode(judge_input_ids(tokenizer, "Which is best?", prompt_format="text"))
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhich is best?" in chat
    assert plain == "Which is best?"
    alphabet, ids = labels_pick(tokenizer, 4)
    assert alphabet.startswith("ABCD") and len({token for variants in ids for token in variants}) >= 4
