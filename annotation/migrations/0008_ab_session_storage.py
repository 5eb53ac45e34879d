from __future__ import annotations

from typing import Any

from django.db import migrations, models


def existing_sessions_open(apps: Any, schema_editor: Any) -> None:
    """Sessions made before this migration were made complete: open since creation, policies from their pairs."""
    Project = apps.get_model("annotation", "Project")
    Completion = apps.get_model("annotation", "Completion")
    for session in Project.objects.filter(kind="ab", opened_at__isnull=True):
        policy_ids = set(
            Completion.objects.filter(prompt__project=session).values_list("policy_id", flat=True)
        )
        session.ab_policies.set(policy_ids)
        Project.objects.filter(pk=session.pk).update(opened_at=session.created_at)


class Migration(migrations.Migration):
    dependencies = [
        ("annotation", "0007_task_order"),
    ]

    operations = [
        migrations.AddField(
            model_name="project",
            name="ab_policies",
            field=models.ManyToManyField(blank=True, related_name="ab_sessions", to="annotation.policy"),
        ),
        migrations.AddField(
            model_name="project",
            name="opened_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(existing_sessions_open, migrations.RunPython.noop),
    ]
