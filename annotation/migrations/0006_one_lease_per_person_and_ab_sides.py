"""One active lease per person and project, and pre-drawn A/B sides.

1. Assignment.project is copied from the task, so the database can hold the
   rule "one active lease per person and project".
2. Before the constraint: where a person holds several active leases in one
   project (two tabs claiming at once), the newest stays and the others
   expire, returning their slots.
3. Every A/B task gets a left side drawn at random, balanced per pair of
   policies within its session.
"""

import random
from collections import defaultdict

import django.db.models.deletion
from django.db import migrations, models


def copy_projects_and_expire_extra_leases(apps, schema_editor):
    Assignment = apps.get_model("annotation", "Assignment")
    Task = apps.get_model("annotation", "Task")
    project_of = dict(Task.objects.values_list("id", "project_id"))
    pending = []
    for assignment in Assignment.objects.filter(project__isnull=True).only("id", "task_id").iterator():
        assignment.project_id = project_of[assignment.task_id]
        pending.append(assignment)
        if len(pending) >= 2000:
            Assignment.objects.bulk_update(pending, ["project"])
            pending.clear()
    Assignment.objects.bulk_update(pending, ["project"])
    seen = set()
    extra = []
    active = Assignment.objects.filter(status="active").order_by("-leased_at", "-id")
    for pk, user_id, project_id in active.values_list("id", "user_id", "project_id"):
        if (user_id, project_id) in seen:
            extra.append(pk)
        seen.add((user_id, project_id))
    Assignment.objects.filter(pk__in=extra).update(status="expired")


def draw_ab_sides(apps, schema_editor):
    TaskCompletion = apps.get_model("annotation", "TaskCompletion")
    Task = apps.get_model("annotation", "Task")
    draw = random.SystemRandom()
    policies = defaultdict(dict)
    rows = TaskCompletion.objects.filter(task__project__kind="ab").values_list(
        "task_id", "task__project_id", "position", "completion__policy_id"
    )
    project_of = {}
    for task_id, project_id, position, policy_id in rows:
        policies[task_id][position] = policy_id
        project_of[task_id] = project_id
    groups = defaultdict(list)
    for task_id, by_position in sorted(policies.items()):
        if sorted(by_position) == [0, 1]:
            groups[(project_of[task_id], *sorted(by_position.values()))].append(task_id)
    updates = []
    for (_project, first, _second), task_ids in groups.items():
        lefts = [first, None] * (len(task_ids) // 2) + [draw.choice([first, None])] * (len(task_ids) % 2)
        draw.shuffle(lefts)
        for task_id, left in zip(task_ids, lefts):
            position = 0 if (policies[task_id][0] == first) == (left == first) else 1
            updates.append(Task(id=task_id, ab_left_position=position))
    Task.objects.bulk_update(updates, ["ab_left_position"], batch_size=2000)


class Migration(migrations.Migration):
    dependencies = [
        ("annotation", "0005_completion_score"),
    ]

    operations = [
        migrations.AddField(
            model_name="assignment",
            name="project",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="annotation.project",
            ),
        ),
        migrations.AddField(
            model_name="task",
            name="ab_left_position",
            field=models.PositiveSmallIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(copy_projects_and_expire_extra_leases, migrations.RunPython.noop),
        migrations.RunPython(draw_ab_sides, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="assignment",
            name="project",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE, related_name="+", to="annotation.project"
            ),
        ),
        migrations.AddConstraint(
            model_name="assignment",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status", "active")),
                fields=("user", "project"),
                name="assignment_one_active_per_person_and_project",
            ),
        ),
    ]
