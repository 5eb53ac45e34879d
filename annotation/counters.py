"""Counters the claim reads, kept by the database in the writer's transaction.

`QueueCounter` holds, per project and person, how many tasks they were
shown (assignments not skipped) and how many of those were gold; the claim
reads that one row to decide whether the next task should be gold, instead
of aggregating the person's whole history on every claim.

Triggers on the assignment table keep it: an insert adds the row's share, a
delete removes it, an update that changes whether it counts (a skip) or
where it counts moves it. So every writer — the claim, the skip, the
reaper, the admin, a cascade — keeps the counter right in its own
transaction, with no extra statement from Django. A task's `is_gold` is
fixed when it is made, so the triggers read it as they fire.

`triggers_install` is idempotent: the migration that made the table runs it
(then backfills), and so does every `migrate` (post_migrate), because
SQLite drops a table's triggers when a later migration rebuilds the table.
"""

from __future__ import annotations

from typing import Any

from django.db import connections

FUNCTION = "annotation_queuecounter_count"
TRIGGERS = (
    "annotation_queuecounter_insert",
    "annotation_queuecounter_update",
    "annotation_queuecounter_delete",
)

# An update moves the row's share only when it changes whether or where it counts.
_UPDATE_WHEN = (
    "(OLD.status = 'skipped') <> (NEW.status = 'skipped') OR OLD.task_id <> NEW.task_id"
    " OR OLD.user_id <> NEW.user_id OR OLD.project_id <> NEW.project_id"
)

_POSTGRESQL = [
    f"""
    CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status <> 'skipped' THEN
            UPDATE annotation_queuecounter
            SET shown = shown - 1,
                shown_gold = shown_gold
                    - COALESCE((SELECT is_gold::int FROM annotation_task WHERE id = OLD.task_id), 0)
            WHERE project_id = OLD.project_id AND user_id = OLD.user_id;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status <> 'skipped' THEN
            INSERT INTO annotation_queuecounter (project_id, user_id, shown, shown_gold)
            VALUES (NEW.project_id, NEW.user_id, 1,
                    (SELECT is_gold::int FROM annotation_task WHERE id = NEW.task_id))
            ON CONFLICT (project_id, user_id) DO UPDATE
            SET shown = annotation_queuecounter.shown + 1,
                shown_gold = annotation_queuecounter.shown_gold + EXCLUDED.shown_gold;
        END IF;
        RETURN NULL;
    END
    $$
    """,  # noqa: S608 — the names are constants of this module
    *(f"DROP TRIGGER IF EXISTS {name} ON annotation_assignment" for name in TRIGGERS),
    f"""
    CREATE TRIGGER {TRIGGERS[0]} AFTER INSERT ON annotation_assignment
    FOR EACH ROW WHEN (NEW.status <> 'skipped') EXECUTE FUNCTION {FUNCTION}()
    """,
    f"""
    CREATE TRIGGER {TRIGGERS[1]} AFTER UPDATE ON annotation_assignment
    FOR EACH ROW WHEN ({_UPDATE_WHEN}) EXECUTE FUNCTION {FUNCTION}()
    """,
    f"""
    CREATE TRIGGER {TRIGGERS[2]} AFTER DELETE ON annotation_assignment
    FOR EACH ROW WHEN (OLD.status <> 'skipped') EXECUTE FUNCTION {FUNCTION}()
    """,
]

_SQLITE_REMOVE = """
    UPDATE annotation_queuecounter
    SET shown = shown - 1,
        shown_gold = shown_gold - COALESCE((SELECT is_gold FROM annotation_task WHERE id = OLD.task_id), 0)
    WHERE project_id = OLD.project_id AND user_id = OLD.user_id AND OLD.status <> 'skipped';
"""
# SQLite's upsert needs a WHERE on its SELECT (a parsing rule); this one is also the condition.
_SQLITE_ADD = """
    INSERT INTO annotation_queuecounter (project_id, user_id, shown, shown_gold)
    SELECT NEW.project_id, NEW.user_id, 1, (SELECT is_gold FROM annotation_task WHERE id = NEW.task_id)
    WHERE NEW.status <> 'skipped'
    ON CONFLICT (project_id, user_id) DO UPDATE
    SET shown = shown + 1, shown_gold = shown_gold + excluded.shown_gold;
"""

_SQLITE = [
    f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[0]} AFTER INSERT ON annotation_assignment"
    f" BEGIN {_SQLITE_ADD} END",
    f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[1]} AFTER UPDATE ON annotation_assignment"
    f" WHEN {_UPDATE_WHEN} BEGIN {_SQLITE_REMOVE} {_SQLITE_ADD} END",
    f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[2]} AFTER DELETE ON annotation_assignment"
    f" BEGIN {_SQLITE_REMOVE} END",
]

# Every counter recounted from the assignments (the migration's backfill, and a repair).
RECOUNT = [
    "DELETE FROM annotation_queuecounter",
    """
    INSERT INTO annotation_queuecounter (project_id, user_id, shown, shown_gold)
    SELECT a.project_id, a.user_id, COUNT(*), SUM(CASE WHEN t.is_gold THEN 1 ELSE 0 END)
    FROM annotation_assignment AS a JOIN annotation_task AS t ON t.id = a.task_id
    WHERE a.status <> 'skipped'
    GROUP BY a.project_id, a.user_id
    """,
]


def triggers_install(*, using: str = "default") -> None:
    """Create (or replace) the counting triggers on this database; PostgreSQL and SQLite."""
    connection = connections[using]
    statements = {"postgresql": _POSTGRESQL, "sqlite": _SQLITE}.get(connection.vendor)
    if statements is None:
        raise NotImplementedError(f"no queue counter triggers for {connection.vendor}")
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def counters_recount(*, using: str = "default") -> None:
    """Recount every counter from the assignments (call inside a transaction to keep it consistent)."""
    with connections[using].cursor() as cursor:
        for statement in RECOUNT:
            cursor.execute(statement)


def triggers_install_after_migrate(*, using: str = "default", **_kwargs: Any) -> None:
    """post_migrate receiver: the triggers exist after every `migrate`, whatever rebuilt the table."""
    from django.db import connections as all_connections

    if "annotation_queuecounter" in all_connections[using].introspection.table_names():
        triggers_install(using=using)
