#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        # Loads config.settings, which stops at a missing or malformed variable:
        # say which in one line instead of a traceback through Django's loader.
        settings.INSTALLED_APPS  # noqa: B018
    except ImproperlyConfigured as error:
        sys.exit(
            f"manage.py: {error}\n"
            "On the demo's database, put DEBUG=1 in front of the command (what `make demo` sets); "
            'on a production machine export the variables of the README\'s "Running it for real".'
        )
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
