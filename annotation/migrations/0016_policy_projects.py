"""Policies belong to projects: each existing policy joins the projects whose outputs it wrote.

The training side's migration (training 0016) adds the projects of its
generation jobs and of the builds that trained it.
"""

from django.db import migrations, models


def policies_join_projects_of_their_outputs(apps, schema_editor):
    Completion = apps.get_model("annotation", "Completion")
    Project = apps.get_model("annotation", "Project")
    Through = apps.get_model("annotation", "Policy").projects.through
    links = set(Completion.objects.values_list("policy_id", "prompt__project_id").distinct())
    # An A/B session's policies, even before their outputs are written.
    links |= set(Project.ab_policies.through.objects.values_list("policy_id", "project_id"))
    Through.objects.bulk_create(
        [Through(policy_id=policy, project_id=project) for policy, project in sorted(links)],
        ignore_conflicts=True,
        batch_size=1000,
    )


class Migration(migrations.Migration):
    dependencies = [
        ("annotation", "0015_judgment_source"),
    ]

    operations = [
        migrations.AddField(
            model_name="policy",
            name="projects",
            field=models.ManyToManyField(
                blank=True,
                help_text="The projects whose managers may see and use this policy.",
                related_name="policies",
                to="annotation.project",
                verbose_name="projects",
            ),
        ),
        migrations.RunPython(policies_join_projects_of_their_outputs, migrations.RunPython.noop),
    ]
