from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class AnnotationConfig(AppConfig):
    name = "annotation"
    verbose_name = "Annotation"

    def ready(self) -> None:
        from annotation.counters import triggers_install_after_migrate
        from annotation.roles import roles_sync_permissions

        # Permissions exist only after every app has migrated, so the manager
        # group is granted them here rather than in the migration that made it.
        post_migrate.connect(roles_sync_permissions, dispatch_uid="annotation.roles_sync_permissions")
        # SQLite drops a table's triggers when a migration rebuilds it: put the counters' back.
        post_migrate.connect(
            triggers_install_after_migrate, sender=self, dispatch_uid="annotation.counters_triggers"
        )
