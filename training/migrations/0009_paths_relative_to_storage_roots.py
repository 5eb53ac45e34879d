# Paths in the database become relative to the storage roots (`artifacts:…`, `models:…`), so
# hosts may mount shared storage at different places (config.storage). Existing absolute paths
# under this deployment's ARTIFACTS_DIR / MODELS_DIR are rewritten; others stay as they are.
#
# Policies live in annotation, but only the training side writes model paths into them, so
# their rewrite is here too: one migration, no second leaf in the other app.

from django.db import migrations

from config.storage import storage_path_resolve, storage_path_stored

FIELDS = (
    ("training", "TrainingRun", ("output_dir", "base_model")),
    ("training", "RewardModel", ("path", "base_model")),
    ("annotation", "Policy", ("base_model", "adapter")),
)


def _rewrite(apps, convert) -> None:  # type: ignore[no-untyped-def]
    for app_label, model_name, fields in FIELDS:
        model = apps.get_model(app_label, model_name)
        for row in model.objects.only("pk", *fields).iterator():
            changed = {field: convert(getattr(row, field)) for field in fields}
            changed = {field: value for field, value in changed.items() if value != getattr(row, field)}
            if changed:
                model.objects.filter(pk=row.pk).update(**changed)


def paths_relative(apps, schema_editor) -> None:  # type: ignore[no-untyped-def]
    _rewrite(apps, storage_path_stored)


def paths_absolute(apps, schema_editor) -> None:  # type: ignore[no-untyped-def]
    _rewrite(apps, storage_path_resolve)


class Migration(migrations.Migration):
    dependencies = [
        ("annotation", "0012_judgment_version"),
        ("training", "0008_run_gpus_and_strategy"),
    ]

    operations = [migrations.RunPython(paths_relative, paths_absolute)]
