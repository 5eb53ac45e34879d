"""Defaults for the test environment, set before pytest-django reads settings.

Loaded as a pytest plugin (see pyproject.toml) so plain `pytest` and `make
test` agree. Each default yields to a value already in the environment.
"""

from __future__ import annotations

import os
import tempfile

TEST_DEFAULTS = {
    # Debug-style values for cookies and redirects; Django still runs the
    # tests themselves with DEBUG off.
    "DEBUG": "1",
    # One database per pytest process (pytest-django prefixes it with test_),
    # so two runs on one machine never drop each other's tables.
    "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/rankwise_{os.getpid()}",
    # A Redis database of its own (1–15, never the demo's 0), so two runs'
    # workers never take each other's tasks.
    "REDIS_URL": f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}",
}

# Files the tests and their Celery worker both write (dataset builds, runs), outside the checkout.
TEST_DEFAULTS["ARTIFACTS_DIR"] = os.path.join(
    tempfile.gettempdir(), f"rankwise-test-{os.getpid()}", "artifacts"
)

for _name, _value in TEST_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
