"""A manager runs projects, members, policies and generation jobs from the app's pages, in real Chromium."""

from __future__ import annotations

import pytest

from annotation.models import Membership, Policy, Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles
from training.models import DatasetBuild, GenerationJob, TrainingRun, TrainingRunMetric

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_manager_creates_a_project_from_manage_with_a_flag_list_and_fixes_an_error(open_page, live_server):
    # given a manager on the Manage page
    manager = user_with_roles(Role.MANAGER, username="host")
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/manage/")

    # when they open "New project" and fill every setting, with three flags typed as rows
    page.click("#manage-links >> text=New project")
    page.wait_for_url(f"{live_server.url}/manage/projects/new")
    page.fill("#id_name", "haiku prefs")
    page.select_option("#id_kind", "ab")
    page.fill("#id_instructions", "Pick the better haiku.")
    page.fill("#id_k", "4")
    page.fill("#id_overlap", "2")
    page.check("#id_likert_enabled")
    page.check("#id_rationale_required")
    page.select_option("#id_task_order", "random")
    page.fill("#id_lease_minutes", "20")
    page.fill("#id_gold_rate", "0.2")
    page.check("#id_gold_feedback")
    rows = page.locator("[data-flag-row] input")
    assert rows.count() == 1  # the script keeps one blank row and shows the Add button
    rows.nth(0).fill("off-topic")
    page.click("#flag-add")
    page.keyboard.type("harmful")
    page.keyboard.press("Enter")  # Enter adds a row instead of submitting
    page.keyboard.type("boring")
    # move "harmful" to the top, remove "boring"
    page.locator("[data-flag-row]").nth(1).locator("[data-flag-up]").click()
    page.locator("[data-flag-row]").nth(2).locator("[data-flag-remove]").click()
    page.click("main button[type=submit]")

    # then nothing is saved: an A/B project judges two at a time, and the error names K
    page.wait_for_selector("#form-errors")
    assert "K: A blind A/B session judges two outputs at a time: K is 2." in page.inner_text("#form-errors")
    assert not Project.objects.exists()
    assert [rows.nth(i).input_value() for i in range(rows.count())] == ["harmful", "off-topic"]

    # when they correct K, then the project is made with every setting, flags in the order shown
    page.fill("#id_k", "2")
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/manage/projects/*/settings")
    project = Project.objects.get(name="haiku prefs")
    assert (project.kind, project.k, project.overlap, project.lease_minutes, project.gold_rate) == (
        "ab",
        2,
        2,
        20,
        0.2,
    )
    assert project.flags == ["harmful", "off-topic"]
    assert project.likert_enabled and project.rationale_required and project.gold_feedback
    assert project.task_order == "random" and project.instructions == "Pick the better haiku."
    assert Membership.objects.filter(project=project, user=manager, role=Role.MANAGER).exists()

    # and editing: a flag removed, another one moved, saved all at once
    page.locator("[data-flag-row]").nth(0).locator("[data-flag-remove]").click()
    page.click("#flag-add")
    page.keyboard.type("unsafe")
    page.locator("[data-flag-row]").nth(1).locator("[data-flag-up]").click()
    page.fill("#id_overlap", "3")
    page.click("main button[type=submit]")
    page.wait_for_selector("text=Settings saved.")
    project.refresh_from_db()
    assert project.flags == ["unsafe", "off-topic"] and project.overlap == 3
    assert watch.errors == []


def test_a_manager_adds_re_roles_and_removes_a_member_and_never_sees_another_project(open_page, live_server):
    # given a ranking project, a person in no project, and another manager's project
    manager = user_with_roles(Role.MANAGER, username="host")
    project = Project.objects.create(name="prefs", k=3)
    add_member(project, manager, Role.MANAGER)
    person = user_with_roles(username="sam")
    other = Project.objects.create(name="not mine")
    page, watch = open_page(manager)

    # when the manager opens Members from Manage and adds "sam" as a labeler
    page.goto(f"{live_server.url}/manage/")
    page.click(f"a[href='/manage/projects/{project.pk}/members']")
    page.fill("#id_username", "sam")
    page.select_option("#id_role", "labeler")
    page.click("#member-add button[type=submit]")

    # then sam is listed as a labeler
    page.wait_for_selector("tr[data-member=sam][data-role=labeler]")
    membership = Membership.objects.get(project=project, user=person)
    assert membership.role == Role.LABELER

    # when the role becomes reviewer
    page.select_option(f"#role-{membership.pk}", "reviewer")
    page.click("tr[data-member=sam] >> text=Change role")
    page.wait_for_selector("tr[data-member=sam][data-role=reviewer]")
    assert list(Membership.objects.filter(user=person).values_list("role", flat=True)) == ["reviewer"]

    # when they remove sam, only after confirming
    page.click("tr[data-member=sam] summary")
    page.click("tr[data-member=sam] >> text=Yes, remove sam")
    page.wait_for_selector("text=sam was removed from the project.")
    assert not Membership.objects.filter(user=person).exists()

    # and the manager's own row offers nothing to change; another project is not found
    assert "Given by a superuser" in page.inner_text("tr[data-member=host]")
    response = page.goto(f"{live_server.url}/manage/projects/{other.pk}/members")
    assert response.status == 404
    assert watch.errors == []


def test_a_generation_jobs_page_shows_its_progress_live_and_ends_on_its_outcome(open_page, live_server):
    # given a queued generation job on a project the manager runs
    manager = user_with_roles(Role.MANAGER, username="host")
    project = Project.objects.create(name="prefs")
    add_member(project, manager, Role.MANAGER)
    policy = Policy.objects.create(name="sft", base_model="/models/sft")
    job = GenerationJob.objects.create(policy=policy, project=project, n=2, prompts_total=8)
    page, watch = open_page(manager)

    # when the manager reaches it from Manage
    page.goto(f"{live_server.url}/manage/")
    page.click("#manage-links >> text=Generation jobs")
    page.click(f"a[href='/generation/{job.pk}/']")
    assert page.inner_text("[data-job-steps]") == "0 / 8"

    # then progress written by the worker shows without a reload
    GenerationJob.objects.filter(pk=job.pk).update(status="running", prompts_done=3)
    page.locator("[data-job-steps]", has_text="3 / 8").wait_for()
    assert page.inner_text("[data-job-status]") == "Running"

    # and when it succeeds the page shows the outcome
    GenerationJob.objects.filter(pk=job.pk).update(status="succeeded", prompts_done=8, completions_written=16)
    page.wait_for_selector("#job-status[data-job-terminal=true]")
    assert "Succeeded" in page.inner_text("#job-status")
    assert watch.errors == []


def test_run_again_carries_gpus_and_strategy_and_the_metrics_table_shows_chosen_columns(
    open_page, live_server
):
    manager = user_with_roles(Role.MANAGER, username="host")
    project = Project.objects.create(name="prefs", k=2)
    add_member(project, manager, Role.MANAGER)
    build = DatasetBuild.objects.create(name="b", created_by=manager, status=DatasetBuild.Status.SUCCEEDED)
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name="wide",
        kind=TrainingRun.Kind.REWARD,
        dataset_build=build,
        base_model="/models/sft",
        created_by=manager,
        gpus=2,
        distributed=TrainingRun.Distributed.FSDP,
        hyperparameters={"max_steps": 40},
    )
    logged = {f"extra/metric_{index:02d}": index / 10 for index in range(22)}
    for step in range(1, 41):
        TrainingRunMetric.objects.create(
            run=run, step=step, values={**logged, "loss": 1 / step, "accuracy": 0.5, "learning_rate": 1e-4}
        )
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/training/runs/{run.pk}/")

    # the table shows the chosen few columns and fits the page; the rest are one click away
    headers = page.locator("#metric-table thead th").all_inner_texts()
    assert headers == ["Step", "loss", "accuracy", "learning_rate"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    page.click("#metric-columns summary")
    page.check("input[name=metric][value='extra/metric_07']")
    page.uncheck("input[name=metric][value='accuracy']")
    page.click("#metric-columns button[type=submit]")
    page.wait_for_url("**metric=extra%2Fmetric_07**")
    headers = page.locator("#metric-table thead th").all_inner_texts()
    assert headers == ["Step", "extra/metric_07", "learning_rate", "loss"]

    # run again: every setting, the GPUs and the strategy included
    page.click("#run-again")
    page.wait_for_selector("#id_base_model")
    assert page.input_value("#id_gpus") == "2"
    assert page.input_value("#id_distributed") == "fsdp"
    assert page.input_value("#id_max_steps") == "40"
    assert watch.errors == []


def test_manage_and_its_links_are_for_managers_only(open_page, live_server):
    labeler = user_with_roles(username="lee")
    add_member(Project.objects.create(name="p"), labeler, Role.LABELER)
    page, _watch = open_page(labeler)
    assert page.locator("nav >> text=Manage").count() == 0
    for path in ("/manage/", "/manage/projects/new", "/policies/", "/generation/"):
        assert page.goto(f"{live_server.url}{path}").status == 403


def test_flags_are_edited_without_the_script_too(browser, live_server):
    from tests.factories import PASSWORD

    # given a project with one flag, and a browser with JavaScript off
    manager = user_with_roles(Role.MANAGER, username="host")
    project = Project.objects.create(name="plain", flags=["harmful"])
    add_member(project, manager, Role.MANAGER)
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "host")
    page.fill("#id_password", PASSWORD)
    page.click("main button[type=submit]")
    page.goto(f"{live_server.url}/manage/projects/{project.pk}/settings")

    # then the flag and two blank rows are there, and the script's buttons are not
    rows = page.locator("[data-flag-row] input")
    assert [rows.nth(i).input_value() for i in range(rows.count())] == ["harmful", "", ""]
    assert not page.is_visible("#flag-add")

    # when a row is emptied and a blank one filled, then that is what is saved
    rows.nth(0).fill("")
    rows.nth(2).fill("off-topic")
    page.click("main button[type=submit]")
    page.wait_for_selector("text=Settings saved.")
    project.refresh_from_db()
    assert project.flags == ["off-topic"]
    context.close()
