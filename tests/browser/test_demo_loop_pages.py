"""The whole loop through the pages only, small, in real Chromium with a real Celery worker.

A manager makes a ranking project, imports arithmetic prompts, registers the
SFT model as a policy of the project, generates samples, adds a labeler who
ranks them, builds a dataset, trains a reward model and a DPO policy from the
build's page, opens a blind A/B session of DPO against SFT, adds an evaluator
who votes, and reads the results reached from Manage. The model is a tiny
untrained one: this checks the pages and the jobs behind them, not that DPO
wins (`make loop` measures that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from annotation.models import Comparison, Policy, Project
from annotation.roles import Role
from annotation.selectors import ab_votes
from tests.browser.test_ranking_page import wait_for_next
from tests.factories import PASSWORD, user_with_roles
from tests.training.conftest import tiny_model_dir  # noqa: F401  (shared fixture)
from training.demo.task import demo_problems
from training.models import DatasetBuild, GenerationJob, TrainingRun

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.worker,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

JOB_WAIT_MS = 300_000
PROMPTS = 6
RUN_SETTINGS = {
    "max_steps": "4",
    "logging_steps": "1",
    "save_steps": "2",
    "per_device_train_batch_size": "2",
    "max_length": "96",
}


def sign_in(browser, live_server, username: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    return context, page, errors


def start_run(page, live_server, build: DatasetBuild, kind: str, model: Path, **extra: str) -> TrainingRun:  # type: ignore[no-untyped-def]
    page.goto(f"{live_server.url}/datasets/{build.pk}/")
    page.click("text=Start a reward-model run" if kind == "reward" else "text=Start a DPO run")
    page.wait_for_selector("#id_base_model")
    page.fill("#id_base_model", str(model))
    for name, value in {**RUN_SETTINGS, **extra}.items():
        page.fill(f"#id_{name}", value)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/training/runs/*/")
    run = TrainingRun.objects.get(kind=kind)
    # the run page polls its status and reloads itself once the run has ended
    page.wait_for_selector("[data-job-terminal=true]", timeout=JOB_WAIT_MS)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error or run.log_tail
    return run


def test_the_demo_loop_runs_through_the_pages_and_ends_on_the_results_reached_from_manage(
    browser,
    live_server,
    celery_worker,
    tiny_model_dir,  # noqa: F811
    tmp_path,
    artifacts_dir,
    monkeypatch,
):
    # the policy check gets the time it needs on a busy test machine (a server answers within 25 s)
    monkeypatch.setattr("training.policies.PROBE_TIMEOUT_S", 300)
    user_with_roles(Role.MANAGER, username="host")
    user_with_roles(username="lab")
    user_with_roles(username="eve")
    context, page, errors = sign_in(browser, live_server, "host")

    # a ranking project of pairs, and its prompts imported
    page.goto(f"{live_server.url}/manage/")
    page.click("#manage-links >> text=New project")
    page.fill("#id_name", "arithmetic")
    page.fill("#id_k", "2")
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/manage/projects/*/settings")
    project = Project.objects.get(name="arithmetic")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"id": problem.id, "prompt": problem.prompt})
            for problem in demo_problems(count=PROMPTS, seed=0, split="train")
        )
    )
    page.click("nav.subnav >> text=Import")
    page.set_input_files("#id_file", str(prompts))
    page.click("#import-form button[type=submit]")
    page.wait_for_selector(f"text=Imported {PROMPTS} prompts")

    # the SFT model becomes a policy of the project, checked (config and tokenizer load) as it is registered
    page.goto(f"{live_server.url}/manage/")
    page.click("#manage-links >> text=Policies")
    page.fill("#id_name", "sft")
    page.fill("#id_base_model", str(tiny_model_dir))
    assert page.is_checked(f"#policy-register input[name=projects][value='{project.pk}']")
    page.click("#policy-register button[type=submit]")
    page.wait_for_selector("tr[data-policy=sft]")

    # the policy writes two samples per prompt; its page follows the job to the end
    page.click("tr[data-policy=sft] >> text=Generate")
    page.wait_for_selector("#generation-new")
    page.select_option("#id_policy", label="sft")
    page.select_option("#id_project", str(project.pk))
    page.fill("#id_n", "2")
    page.fill("#id_max_new_tokens", "8")
    page.click("#generation-new button[type=submit]")
    page.wait_for_selector("#job-status[data-job-terminal=true]", timeout=JOB_WAIT_MS)
    job = GenerationJob.objects.get()
    assert job.status == GenerationJob.Status.SUCCEEDED, job.error or job.log_tail
    tasks = project.tasks.count()
    assert tasks >= PROMPTS - 1

    # a labeler is added and ranks every task with the keyboard
    page.goto(f"{live_server.url}/manage/projects/{project.pk}/members")
    page.fill("#id_username", "lab")
    page.select_option("#id_role", "labeler")
    page.click("#member-add button[type=submit]")
    page.wait_for_selector("tr[data-member=lab]")
    lab_context, lab, lab_errors = sign_in(browser, live_server, "lab")
    lab.get_by_role("link", name="Label", exact=True).click()
    lab.get_by_role("link", name="arithmetic").first.click()
    lab.wait_for_selector("#current-task")
    current = lab.get_attribute("#current-task", "data-assignment")
    while current:
        for letter, rank in (("a", "1"), ("b", "2")):
            lab.keyboard.press(letter)
            lab.keyboard.press(rank)
        lab.keyboard.press("Control+Enter")
        current = wait_for_next(lab, current)
    lab_context.close()
    assert Comparison.objects.filter(project=project).count() == tasks

    # a dataset build of the project
    page.goto(f"{live_server.url}/datasets/new")
    page.fill("#id_name", "arithmetic v1")
    page.check(f"input[name=projects][value='{project.pk}']")
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/datasets/*/")
    # the build page polls its status and reloads itself once the build has ended
    page.wait_for_selector("[data-job-terminal=true]", timeout=JOB_WAIT_MS)
    build = DatasetBuild.objects.get()
    assert build.status == DatasetBuild.Status.SUCCEEDED, build.error

    # a reward model and a DPO policy, each started from the build's page
    start_run(page, live_server, build, "reward", tiny_model_dir)
    dpo = start_run(page, live_server, build, "dpo", tiny_model_dir, learning_rate="0.05")
    assert dpo.policy is not None

    # a blind A/B session of DPO against SFT opens by itself once both have answered
    page.goto(f"{live_server.url}/manage/")
    page.click("#manage-links >> text=New A/B session")
    page.fill("#id_name", "dpo vs sft")
    page.select_option("#id_source_project", str(project.pk))
    for policy in (Policy.objects.get(name="sft"), dpo.policy):
        page.check(f"input[name=policies][value='{policy.pk}']")
    page.fill("#id_max_new_tokens", "8")
    page.click("main button[type=submit]")
    session = Project.objects.get(name="dpo vs sft")
    page.wait_for_selector("#session-state[data-state=open]", timeout=JOB_WAIT_MS)
    pairs = session.tasks.count()
    assert pairs >= 1
    assert project.tasks.count() == tasks  # the source project is untouched

    # an evaluator is added and votes on every pair
    page.fill("#id_username", "eve")
    page.click("text=Add as evaluator")
    page.wait_for_selector("#evaluators")
    eve_context, eve, eve_errors = sign_in(browser, live_server, "eve")
    eve.get_by_role("link", name="Evaluate", exact=True).click()
    eve.get_by_role("link", name="dpo vs sft").first.click()
    eve.wait_for_selector("#current-task")
    current = eve.get_attribute("#current-task", "data-assignment")
    while current:
        eve.keyboard.press("1")
        eve.keyboard.press("Enter")
        current = wait_for_next(eve, current)
    eve_context.close()
    assert len(ab_votes(project=session)) == pairs

    # the results, reached from Manage
    page.goto(f"{live_server.url}/manage/")
    page.click(f"a[href='/manage/projects/{session.pk}/results']")
    page.wait_for_url(f"{live_server.url}/manage/projects/{session.pk}/results")
    page.screenshot(path=str(artifacts_dir / "demo-loop-results.png"), full_page=True)
    assert "dpo vs sft" in page.inner_text("main")
    context.close()
    assert errors == lab_errors == eve_errors == []
