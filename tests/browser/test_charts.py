"""Charts drawn by Chart.js in real Chromium: the tick labels it rendered, and a live run's curve growing."""

from __future__ import annotations

import pytest

from annotation.models import Policy
from annotation.roles import Role
from annotation.services import JudgmentInput, assignment_claim_next, judgment_submit
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import session
from tests.factories import user_with_roles
from training.models import DatasetBuild, TrainingRun, TrainingRunMetric

pytestmark = pytest.mark.django_db(transaction=True)

# The labels Chart.js drew on an axis of the chart in a canvas.
TICKS = "([selector, axis]) => Chart.getChart(document.querySelector(selector)).scales[axis].ticks.map(t => t.label)"
POINTS = "selector => Chart.getChart(document.querySelector(selector)).data.datasets[0].data.length"


def ticks(page, selector: str, axis: str = "y") -> list[str]:  # type: ignore[no-untyped-def]
    page.wait_for_function(
        "selector => window.Chart && Chart.getChart(document.querySelector(selector))", arg=selector
    )
    return page.evaluate(TICKS, [selector, axis])


def hover_point(page, selector: str, index: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Move the mouse onto the chart's point `index` and return the tooltip's lines."""
    page.locator(selector).scroll_into_view_if_needed()
    x, y = page.evaluate(
        "([selector, index]) => { const canvas = document.querySelector(selector);"
        " const point = Chart.getChart(canvas).getDatasetMeta(0).data[index];"
        " const box = canvas.getBoundingClientRect(); return [box.left + point.x, box.top + point.y]; }",
        [selector, index],
    )
    page.mouse.move(x, y)
    page.wait_for_function(
        "selector => Chart.getChart(document.querySelector(selector)).tooltip.opacity > 0", arg=selector
    )
    return page.evaluate(
        "selector => Chart.getChart(document.querySelector(selector)).tooltip.body.flatMap(item => item.lines)",
        selector,
    )


def as_number(label: str) -> float:
    return float(label.replace(",", "").replace("%", "").replace("\u2212", "-"))


@pytest.fixture
def live_run(make_project):  # type: ignore[no-untyped-def]
    """A running reward run whose manager may see it, with a loss in (0, 1) and a margin below zero."""
    project = make_project(tasks=1, k=2, name="curves")
    manager = add_member(project, user_with_roles(Role.MANAGER, username="curator"), Role.MANAGER)
    build = DatasetBuild.objects.create(name="curves build", created_by=manager, status="succeeded")
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name="live",
        kind="reward",
        dataset_build=build,
        base_model="m",
        status="running",
        step=4000,
        total_steps=9000,
    )
    for step, loss, margin in (
        (1000, 0.69, -0.42),
        (2000, 0.67, -0.2),
        (3000, 0.66, 0.05),
        (4000, 0.64, 0.18),
    ):
        TrainingRunMetric.objects.create(run=run, step=step, values={"loss": loss, "margin": margin})
    return run, manager


def test_run_curves_label_small_values_negatives_and_thousands_as_they_are(
    open_page, live_server, live_run, artifacts_dir
):
    run, manager = live_run
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/training/runs/{run.pk}/")

    loss = ticks(page, 'canvas[data-chart="curve-loss"]')
    margin = ticks(page, 'canvas[data-chart="curve-margin"]')
    steps = ticks(page, 'canvas[data-chart="curve-loss"]', "x")

    # values in (0, 1) keep their decimals: no "1, 0, 0"
    assert "0.65" in loss, loss
    assert all(0.6 <= as_number(label) <= 0.7 for label in loss), loss
    assert len(set(loss)) == len(loss) > 2
    # a margin below zero gets negative ticks, not a line under the axis
    assert min(as_number(label) for label in margin) <= -0.4, margin
    assert any(label.startswith(("-", "\u2212")) for label in margin), margin
    # steps in the thousands read with a separator
    assert "1,000" in steps and "4,000" in steps, steps
    # hovering a point shows its value
    assert hover_point(page, 'canvas[data-chart="curve-margin"]', 1) == ["margin: -0.2"]
    page.screenshot(path=str(artifacts_dir / "run-curves.png"), full_page=True)
    assert watch.errors == [] and watch.foreign_requests == []


def test_a_live_runs_curve_gains_points_without_a_reload(open_page, live_server, live_run):
    run, manager = live_run
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/training/runs/{run.pk}/")
    ticks(page, 'canvas[data-chart="curve-loss"]')
    assert page.evaluate(POINTS, 'canvas[data-chart="curve-loss"]') == 4
    page.evaluate("window.loadedOnce = true")

    # when the run logs two more steps and a new metric
    for step, loss in ((5000, 0.61), (6000, 0.58)):
        TrainingRunMetric.objects.create(run=run, step=step, values={"loss": loss, "accuracy": 0.7})
    TrainingRun.objects.filter(pk=run.pk).update(step=6000)

    # then the page's curve has them, and the new curve appears, with no reload
    page.wait_for_function(
        "selector => Chart.getChart(document.querySelector(selector))?.data.datasets[0].data.length === 6",
        arg='canvas[data-chart="curve-loss"]',
    )
    page.wait_for_selector('[data-curve="accuracy"] canvas')
    assert page.evaluate("window.loadedOnce") is True
    assert "0.60" in ticks(page, 'canvas[data-chart="curve-loss"]')
    assert watch.errors == [] and watch.foreign_requests == []


def test_the_ab_results_show_elo_ratings_with_thousands_separators(open_page, live_server, artifacts_dir):
    policies = [Policy.objects.create(name="chart-left"), Policy.objects.create(name="chart-right")]
    manager = user_with_roles(Role.MANAGER, username="host")
    project = session(policies, manager, prompts=4, votes_per_pair=1)
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="voter"), Role.EVALUATOR)
    for number in range(4):
        assignment = assignment_claim_next(project=project, user=evaluator)
        left, right = (str(item.completion.uid) for item in assignment.task.items.order_by("position"))
        answer = JudgmentInput(ranks={left: 1, right: 2 if number else 1}, client_token=f"v{number}")
        judgment_submit(assignment=assignment, user=evaluator, answer=answer)

    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/manage/projects/{project.pk}/results")
    labels = ticks(page, 'canvas[data-chart="chart-ratings"]', "x")

    assert any("," in label and 900 <= as_number(label) <= 1100 for label in labels), labels
    page.screenshot(path=str(artifacts_dir / "ab-results.png"), full_page=True)
    assert watch.errors == [] and watch.foreign_requests == []


def test_a_builds_row_counts_are_drawn_with_whole_thousands(open_page, live_server, make_project):
    project = make_project(tasks=1, k=2, name="rows")
    manager = add_member(project, user_with_roles(Role.MANAGER, username="builder"), Role.MANAGER)
    build = DatasetBuild.objects.create(
        name="big build",
        created_by=manager,
        status="succeeded",
        progress=1.0,
        counts={"pairs": {"train": 1200, "test": 300}, "grouped": {"train": 400, "test": 100}},
    )
    build.projects.add(project)
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/datasets/{build.pk}/")

    labels = ticks(page, 'canvas[data-chart="chart-rows"]')

    assert labels[0] == "0" and "1,000" in labels, labels
    assert all(label.replace(",", "").isdigit() for label in labels), labels
    assert hover_point(page, 'canvas[data-chart="chart-rows"]', 0) == ["train: 1,200"]
    assert watch.errors == [] and watch.foreign_requests == []
