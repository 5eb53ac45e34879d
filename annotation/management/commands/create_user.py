from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.roles import Role
from annotation.selectors import project_by_reference
from annotation.services import user_create


class Command(BaseCommand):
    help = (
        "Create a user with one or more roles, in a project with --project; "
        "prints the generated password unless --password is given."
    )

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
        parser.add_argument(
            "--project",
            help="project id or exact name the roles are held in (a labeler or evaluator needs one to work)",
        )
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="default: a generated one, printed once")

    def handle(self, *args: Any, **options: Any) -> None:
        project = None
        if options["project"]:
            project = project_by_reference(reference=options["project"])
            if project is None:
                raise CommandError(f"no project with the id or name {options['project']!r}")
        try:
            user, password = user_create(
                username=options["username"],
                roles=options["roles"],
                email=options["email"],
                password=options["password"],
                project=project,
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        except ValidationError as error:
            raise CommandError("password rejected: " + " ".join(error.messages)) from None
        where = f" in {project.name}" if project is not None else ""
        self.stdout.write(f"created {user.username} ({', '.join(options['roles'])}{where})")
        if project is None and set(options["roles"]) - {Role.MANAGER}:
            self.stdout.write(
                f"{user.username} is a member of no project yet: a manager adds them to one "
                "(or pass --project), and only then can they label or evaluate."
            )
        if not options["password"]:
            self.stdout.write(f"password: {password}")
