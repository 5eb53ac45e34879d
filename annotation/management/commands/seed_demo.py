from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from annotation.importing import prompts_import
from annotation.models import Membership, Policy, Project
from annotation.roles import Role
from annotation.services import ab_session_create
from config.storage import storage_path_stored

DEMO_DATA = Path(__file__).resolve().parents[2] / "demo_data" / "ranking.jsonl"
DEMO_PROJECT = "Demo: helpful answers"
# The loop in the browser: arithmetic word problems, the task the demo model
# was trained on (written from training/demo/task.py's train and test splits).
ARITHMETIC_DATA = DEMO_DATA.with_name("arithmetic.jsonl")
ARITHMETIC_HELDOUT_DATA = DEMO_DATA.with_name("arithmetic_heldout.jsonl")
ARITHMETIC_PROJECT = "Demo: arithmetic"
ARITHMETIC_HELDOUT_PROJECT = "Demo: arithmetic, held out"
DEMO_SFT_POLICY = "demo-sft"
ARITHMETIC_INSTRUCTIONS = """\
Each response answers a small arithmetic word problem. Work the answer out yourself, then rank:

1. responses with the **right** number first (equal ranks between right ones are fine),
2. then responses with a **wrong** number,
3. then responses that state **no** number at all.

Press `?` for the keyboard shortcuts.
"""
HELDOUT_INSTRUCTIONS = """\
Problems the demo model never saw: the prompts for a blind A/B session of a new policy against demo-sft.
Nobody ranks here.
"""
DEMO_AB_SESSION = "Demo: blind A/B"
# Two of the demo data's imported sources, close enough in quality that votes are not obvious.
DEMO_AB_POLICIES = ("sft-large", "sft-small")
AB_INSTRUCTIONS = """\
Which response answers the prompt better? Judge correctness first, then helpfulness and clarity.

Keys: `1` or `←` left, `2` or `→` right, `t` tie, `b` both bad.
"""
INSTRUCTIONS = """\
Rank the responses to each prompt from **best (1)** to **worst**.

- Prefer answers that are *correct*, *helpful* and *clear*, in that order.
- Give two responses the same rank when you truly cannot prefer one.
- Flag a response that is harmful or contains an injection attempt.

Press `?` for the keyboard shortcuts.
"""


class Command(BaseCommand):
    help = (
        "Create the demo ranking project with readable prompts and completions of clearly different quality, "
        "and a blind A/B session comparing two of its sources."
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
        manager = User.objects.filter(username="manager").first()
        session = Project.objects.filter(name=DEMO_AB_SESSION, kind=Project.Kind.AB).first()
        if session is None and manager is None:
            self.stdout.write("Demo A/B session: skipped, no `manager` account (run demo_users first).")
        elif session is None:
            session = ab_session_create(
                name=DEMO_AB_SESSION,
                policies=list(Policy.objects.filter(name__in=DEMO_AB_POLICIES)),
                prompts=list(project.prompts.order_by("id")),
                votes_per_pair=2,
                created_by=manager,
                instructions=AB_INSTRUCTIONS,
            )
            self.stdout.write(f"Demo A/B session: {session.tasks.count()} pairs to vote on.")
        arithmetic, heldout = self._arithmetic()
        memberships = (
            (arithmetic, "manager", Role.MANAGER),
            (arithmetic, "labeler", Role.LABELER),
            (heldout, "manager", Role.MANAGER),
            (project, "manager", Role.MANAGER),
            (project, "labeler", Role.LABELER),
            (project, "evaluator", Role.EVALUATOR),
            (session, "manager", Role.MANAGER),
            (session, "evaluator", Role.EVALUATOR),
        )
        for target, username, role in memberships:
            if target is None:
                continue
            user = User.objects.filter(username=username).first()
            if user is not None:
                Membership.objects.get_or_create(project=target, user=user, role=role)

    def _arithmetic(self) -> tuple[Project, Project]:
        """The projects of the loop in the browser, and the demo model registered as the policy `demo-sft`.

        The prompts come without answers: the manager's first step is a
        generation job of demo-sft (four samples a prompt), which makes the
        ranking tasks.
        """
        policy, _created = Policy.objects.get_or_create(
            name=DEMO_SFT_POLICY,
            defaults={
                "kind": Policy.Kind.MODEL,
                "base_model": storage_path_stored(Path(settings.MODELS_DIR) / "demo-sft"),
            },
        )
        projects = []
        for name, data, fields in (
            (ARITHMETIC_PROJECT, ARITHMETIC_DATA, {"k": 4, "instructions": ARITHMETIC_INSTRUCTIONS}),
            (
                ARITHMETIC_HELDOUT_PROJECT,
                ARITHMETIC_HELDOUT_DATA,
                {"k": 2, "instructions": HELDOUT_INSTRUCTIONS},
            ),
        ):
            project, created = Project.objects.get_or_create(
                name=name,
                defaults={"kind": Project.Kind.RANKING, "overlap": 1, "ties_allowed": True, **fields},
            )
            if created:
                with data.open("rb") as lines:
                    report = prompts_import(project=project, data=lines)
                self.stdout.write(f"{name}: {report.prompts_created} prompts (answered by {policy.name}).")
            projects.append(project)
        # The demo model is registered for the arithmetic projects: their managers see and use it.
        policy.projects.add(*projects)
        return projects[0], projects[1]
