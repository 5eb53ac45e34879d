from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.roles import Role
from annotation.services import user_create


class Command(BaseCommand):
    help = "Create a user with one or more roles; prints the generated password unless --password is given."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--role",
            dest="roles",
            action="append",
            required=True,
            choices=Role.values,
            help="repeat for several roles",
        )
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="default: a generated one, printed once")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user, password = user_create(
                username=options["username"],
                roles=options["roles"],
                email=options["email"],
                password=options["password"],
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        except ValidationError as error:
            raise CommandError("password rejected: " + " ".join(error.messages)) from None
        self.stdout.write(f"created {user.username} ({', '.join(options['roles'])})")
        if not options["password"]:
            self.stdout.write(f"password: {password}")
