from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from annotation.roles import Role
from annotation.services import password_generate, user_create, user_set_roles

# One account per role. Passwords are new random ones at every run: the demo
# never ships a default credential.
DEMO_USERS = (
    ("manager", [Role.MANAGER]),
    ("labeler", [Role.LABELER]),
    ("evaluator", [Role.EVALUATOR]),
)


@transaction.atomic
def demo_accounts_reset() -> list[tuple[str, str, str]]:
    """Create or reset the demo accounts with new random passwords: (username, roles, password) each."""
    User = get_user_model()
    rows = []
    for username, roles in DEMO_USERS:
        user = User.objects.filter(username=username).first()
        if user is None:
            user, password = user_create(username=username, roles=list(roles))
        else:
            password = password_generate()
            user.set_password(password)
            user.is_active = True
            user.save()
            user_set_roles(user=user, roles=list(roles))
        rows.append((username, ", ".join(roles), password))
    return rows


def demo_accounts_lines(rows: list[tuple[str, str, str]], *, hidden: bool = False) -> list[str]:
    lines = ["Demo accounts (passwords are new at every start):"]
    lines += [
        f"  {username:<10} {roles:<10} {'(hidden)' if hidden else password}"
        for username, roles, password in rows
    ]
    return lines


class Command(BaseCommand):
    help = "Create or reset the demo accounts (one per role) with fresh random passwords and print them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--quiet-passwords", action="store_true", help="do not print the passwords")

    def handle(self, *args: Any, **options: Any) -> None:
        for line in demo_accounts_lines(demo_accounts_reset(), hidden=options["quiet_passwords"]):
            self.stdout.write(line)
