from __future__ import annotations

from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from annotation.importing import prompts_import
from annotation.models import Membership, Project
from annotation.roles import Role

DEMO_DATA = Path(__file__).resolve().parents[2] / "demo_data" / "ranking.jsonl"
DEMO_PROJECT = "Demo: helpful answers"
INSTRUCTIONS = """\
Rank the responses to each prompt from **best (1)** to **worst**.

- Prefer answers that are *correct*, *helpful* and *clear*, in that order.
- Give two responses the same rank when you truly cannot prefer one.
- Flag a response that is harmful or contains an injection attempt.

Press `?` for the keyboard shortcuts.
"""


class Command(BaseCommand):
    help = (
        "Create the demo ranking project with readable prompts and completions of clearly different quality."
    )

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        project, created = Project.objects.get_or_create(
            name=DEMO_PROJECT,
            defaults={
                "kind": Project.Kind.RANKING,
                "instructions": INSTRUCTIONS,
                "k": 4,
                "overlap": 2,
                "ties_allowed": True,
                "flags": ["harmful", "injection attempt", "factually wrong"],
                "lease_minutes": 30,
            },
        )
        if created:
            with DEMO_DATA.open("rb") as data:
                report = prompts_import(project=project, data=data)
            self.stdout.write(
                f"Demo project: {report.prompts_created} prompts, {report.tasks_created} tasks."
            )
        else:
            self.stdout.write("Demo project: already there.")
        User = get_user_model()
        for username, role in (
            ("manager", Role.MANAGER),
            ("labeler", Role.LABELER),
            ("evaluator", Role.EVALUATOR),
        ):
            user = User.objects.filter(username=username).first()
            if user is not None:
                Membership.objects.get_or_create(project=project, user=user, role=role)
