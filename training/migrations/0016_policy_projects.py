"""Policies belong to projects: each existing policy joins the projects of its generation jobs and,
when a run registered it (or a best-of-n policy stands on its reward model), the projects of that
run's dataset build."""

from django.db import migrations


def policies_join_projects_of_their_jobs_and_builds(apps, schema_editor):
    Through = apps.get_model("annotation", "Policy").projects.through
    GenerationJob = apps.get_model("training", "GenerationJob")
    TrainingRun = apps.get_model("training", "TrainingRun")
    BestOfN = apps.get_model("training", "BestOfN")
    links = set(GenerationJob.objects.values_list("policy_id", "project_id").distinct())
    links |= set(
        TrainingRun.objects.filter(policy__isnull=False)
        .values_list("policy_id", "dataset_build__projects")
        .distinct()
    )
    links |= set(
        BestOfN.objects.values_list("policy_id", "reward_model__run__dataset_build__projects").distinct()
    )
    Through.objects.bulk_create(
        [
            Through(policy_id=policy, project_id=project)
            for policy, project in sorted(link for link in links if link[1] is not None)
        ],
        ignore_conflicts=True,
        batch_size=1000,
    )


class Migration(migrations.Migration):
    dependencies = [
        ("annotation", "0016_policy_projects"),
        ("training", "0015_continuous_training"),
    ]

    operations = [
        migrations.RunPython(policies_join_projects_of_their_jobs_and_builds, migrations.RunPython.noop),
    ]
