"""Hardening that holds for every page and every door, not just the ones someone remembered.

Covered elsewhere, not repeated here:

- `manage.py check --deploy --fail-level WARNING` with production values:
  tests/test_settings.py::test_the_deploy_check_passes_with_production_values
  (and ::test_the_deploy_check_fails_with_a_short_secret_key);
- login throttling (django-axes): tests/test_accounts.py::test_repeated_wrong_passwords_lock_the_account_even_for_the_right_one
  and the tests around it;
- demo accounts get new random passwords at every start:
  tests/test_accounts.py::test_demo_users_prints_new_passwords_at_every_run;
- who may reach which object: tests/security/test_access_matrix.py.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from django.urls import get_resolver
from pytest_django import Settings

from annotation.roles import Role
from tests.factories import user_with_roles
from tests.security.test_access_matrix import (
    NOT_OBJECT_PARAMETERS,
    World,
    build_world,
    database_state,
    door_for,
    url_of,
    walk,
)
from training.archives import run_archive_write
from training.models import TrainingRun
from training.selectors import dataset_build_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIRS = ("annotation", "training")
# A <script> that runs code: any without src=, except JSON data islands (json_script).
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>", re.IGNORECASE)


@pytest.fixture
def world(db: None) -> World:
    return build_world()


def parameterless_routes() -> list[str]:
    return sorted(route for route, names in walk(get_resolver().url_patterns) if not names)


# Redoc (the API docs page) styles itself with inline <style>; that page shows
# only the schema, and its scripts are held to 'self' like every other page's.
INLINE_STYLE_ALLOWED = {"/api/redoc/"}


def assert_security_headers(response: Any, url: str) -> None:
    csp = response.get("Content-Security-Policy", "")
    directives = dict(
        (part.split()[0], part.split()[1:]) for part in (item.strip() for item in csp.split(";")) if part
    )
    assert directives.get("script-src") == ["'self'"], (url, csp)
    assert "unsafe-eval" not in csp, (url, csp)
    if url not in INLINE_STYLE_ALLOWED:
        assert "unsafe-inline" not in csp, (url, csp)
    assert "frame-ancestors 'none'" in csp, (url, csp)
    assert response.get("X-Frame-Options") == "DENY", url
    assert response.get("X-Content-Type-Options") == "nosniff", url
    assert response.get("Referrer-Policy") == "same-origin", url
    if response.get("Content-Type", "").startswith("text/html") and not response.streaming:
        html = response.content.decode()
        assert not INLINE_SCRIPT.search(html), (url, INLINE_SCRIPT.search(html).group(0))
        assert " onclick=" not in html and " onload=" not in html, url


# --- headers on every page -------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["manager", "labeler", "anonymous"])
def test_every_page_without_an_id_carries_the_security_headers_and_no_inline_script(
    world: World, who: str
) -> None:
    client = Client()
    if who != "anonymous":
        client.force_login(world.manager if who == "manager" else world.actors["labeler"])
    routes = parameterless_routes()
    assert "accounts/login/" in routes and "label/" in routes

    for route in routes:
        url = "/" + route
        response = client.get(url)
        assert response.status_code < 500, url
        assert_security_headers(response, url)


@pytest.mark.django_db
def test_the_object_pages_their_owners_open_carry_the_security_headers_too(world: World) -> None:
    manager, labeler = Client(), Client()
    manager.force_login(world.manager)
    labeler.force_login(world.actors["labeler"])
    pages = [
        (manager, f"/manage/projects/{world.project.pk}/"),
        (manager, f"/datasets/{world.build.pk}/"),
        (manager, f"/training/runs/{world.run.pk}/"),
        (manager, f"/admin/annotation/project/{world.project.pk}/change/"),
        (manager, f"/admin/annotation/project/{world.project.pk}/import/"),
        (labeler, f"/label/{world.project.pk}/"),
    ]
    for client, url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert_security_headers(response, url)


# --- CSRF on every state-changing door ------------------------------------------------


def every_url(world: World) -> list[str]:
    """One concrete URL per pattern: objects from the world, harmless fillers for the rest."""
    urls = []
    for route, names in walk(get_resolver().url_patterns):
        if names - NOT_OBJECT_PARAMETERS:
            door, label = door_for(route)
            urls.append(url_of(route, world, door, label))
        elif names:  # the admin's app index and catch-all
            urls.append("/admin/annotation/" if "app_label" in names else "/admin/nothing-here/")
        else:
            urls.append("/" + route)
    return sorted(set(urls))


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["superuser", "holder", "labeler"])
def test_every_post_without_the_csrf_token_is_refused_and_changes_nothing(world: World, who: str) -> None:
    # given a signed-in session in a client that checks CSRF like a browser
    # (the superuser passes every access rule; the holder owns the assignment; the labeler may claim)
    user = {"superuser": world.superuser, "holder": world.holder, "labeler": world.actors["labeler"]}[who]
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    before = database_state()
    problems = []

    # when every URL is posted to without the token (with a body that would act)
    for url in every_url(world):
        response = client.post(url, {"post": "yes", "reason": "x", "name": "taken over"})

        # then it is refused for the missing token, before any view runs
        if response.status_code != 403 or b"CSRF" not in response.content:
            problems.append(f"POST {url}: {response.status_code} {response.content[:80]!r}")
    assert not problems, "\n".join(problems)
    assert database_state() == before


@pytest.mark.django_db
def test_the_same_posts_pass_with_the_token_so_the_refusals_above_are_about_csrf(world: World) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.holder)
    client.get("/label/")
    token = client.cookies["csrftoken"].value

    assert client.post(f"/label/{world.project.pk}/next", HTTP_X_CSRFTOKEN=token).status_code == 200
    response = client.post(f"/api/projects/{world.project.pk}/next", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200 and response.json()["id"] == world.held.pk


# --- no user-controlled ORM lookups ----------------------------------------------------


@pytest.mark.django_db
def test_the_run_list_ignores_filters_it_does_not_know(world: World) -> None:
    client = Client()
    client.force_login(world.manager)
    TrainingRun.objects.create(
        name="failed one", kind="dpo", dataset_build=world.build, base_model="m", status="failed"
    )
    plain = client.get("/training/runs/")
    names = {run.name for run in plain.context["runs"]}
    assert {"matrix run", "failed one"} <= names

    for query in (
        "?status=bogus&kind=nope",
        "?order_by=-created_by__password",
        "?created_by__password__startswith=md5",
        "?dataset_build__created_by__is_superuser=true",
        "?status=queued%27%20OR%201=1--",
        "?status[]=queued&kind=",
    ):
        response = client.get("/training/runs/" + query)
        assert response.status_code == 200, query
        assert {run.name for run in response.context["runs"]} == names, query
        assert response.context["active"] == {}, query

    filtered = client.get("/training/runs/?status=failed&kind=dpo&order_by=name")
    assert [run.name for run in filtered.context["runs"]] == ["failed one"]


PROBE = "?order_by=-password&created_by__password__startswith=md5&status=bogus&kind=nope&id=1&pk__gt=0"


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/dataset-builds/", "/api/training-runs/", "/api/projects/"])
def test_the_api_lists_ignore_query_parameters(world: World, url: str) -> None:
    client = Client()
    client.force_login(world.manager)
    plain, probed = client.get(url), client.get(url + PROBE)
    assert plain.status_code == probed.status_code == 200
    assert probed.json() == plain.json() != []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "rows"), [("/datasets/", "builds"), ("/manage/", "rows"), ("/label/", "rows")]
)
def test_the_page_lists_ignore_query_parameters(world: World, url: str, rows: str) -> None:
    client = Client()
    client.force_login(world.holder if url == "/label/" else world.manager)
    plain, probed = client.get(url), client.get(url + PROBE)
    assert plain.status_code == probed.status_code == 200
    assert list(probed.context[rows]) == list(plain.context[rows])


QUERY_METHODS = {
    "filter",
    "exclude",
    "get",
    "order_by",
    "annotate",
    "alias",
    "aggregate",
    "values",
    "values_list",
    "distinct",
    "only",
    "defer",
    "extra",
    "raw",
    "select_related",
    "prefetch_related",
    "get_or_create",
    "update_or_create",
    "update",
    "Q",
}
# Methods whose positional arguments are field names (lookups), not values.
NAME_ARGUMENT_METHODS = QUERY_METHODS - {
    "filter",
    "exclude",
    "get",
    "Q",
    "get_or_create",
    "update_or_create",
    "update",
}
REQUEST_INPUTS = {"GET", "POST", "data", "query_params", "FILES", "COOKIES", "headers", "META", "body"}


def _reads_request(node: ast.AST, tainted: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in REQUEST_INPUTS:
            base = sub.value
            if (isinstance(base, ast.Name) and base.id == "request") or (
                isinstance(base, ast.Attribute) and base.attr == "request"
            ):
                return True
        if isinstance(sub, ast.Name) and sub.id in tainted:
            return True
    return False


def user_controlled_lookups(source: str, filename: str = "<source>") -> list[str]:
    """`order_by(`, `values(`… with a request value as a field name, or `**` lookups whose keys come from
    the request — directly or through a variable assigned from it in the same function."""
    found = []
    for function in ast.walk(ast.parse(source, filename)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module):
            continue
        tainted: set[str] = set()
        for node in ast.walk(function):
            value = getattr(node, "value", None)
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            assigns = isinstance(node, ast.Assign | ast.AnnAssign | ast.NamedExpr) and value is not None
            if assigns and _reads_request(value, tainted):
                tainted |= {t.id for t in targets if isinstance(t, ast.Name)}
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in QUERY_METHODS:
                continue
            for keyword in node.keywords:
                if keyword.arg is not None:
                    continue
                spread = keyword.value
                keys = spread.keys if isinstance(spread, ast.Dict) else [spread]
                if any(key is not None and _reads_request(key, tainted) for key in keys):
                    found.append(f"{filename}:{node.lineno}: {name}(**…) with lookups from the request")
            if name in NAME_ARGUMENT_METHODS and any(_reads_request(arg, tainted) for arg in node.args):
                found.append(f"{filename}:{node.lineno}: {name}(…) with a field name from the request")
    return sorted(set(found))  # a module's walk sees its functions' calls again


def test_the_lookup_check_catches_what_it_is_meant_to_catch() -> None:
    bad = """
def view(request):
    sort = request.GET.get("sort", "id")
    a = Run.objects.order_by(request.GET["sort"])
    b = Run.objects.filter(**request.GET.dict())
    c = Run.objects.order_by(sort)
    d = Run.objects.filter(**{request.GET["field"]: 1})
    e = Run.objects.values(self.request.query_params["f"])
"""
    assert len(user_controlled_lookups(bad)) == 5
    good = """
def view(request):
    value = request.GET.get("status", "")
    for name, allowed in FILTERS.items():
        if value in allowed:
            runs = runs.filter(**{name: value})
    runs = runs.filter(pk=request.GET.get("id")).order_by("-created_at")
"""
    assert user_controlled_lookups(good) == []


def test_no_view_or_service_builds_orm_lookups_from_the_request() -> None:
    found = []
    for app in APP_DIRS:
        for path in sorted((REPO_ROOT / app).rglob("*.py")):
            if "migrations" not in path.parts:
                found += user_controlled_lookups(path.read_text(), str(path.relative_to(REPO_ROOT)))
    assert not found, "\n".join(found)


# --- files only by id, as attachments ---------------------------------------------------


@pytest.fixture
def files(world: World, settings: Settings, tmp_path: Path) -> World:
    """The world's build and run, with files on disk like a finished build and run have."""
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    folder = dataset_build_dir(build_id=world.build.pk)
    (folder / "pairs").mkdir(parents=True)
    (folder / "README.md").write_text("# card\n")
    (folder / "pairs" / "train.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "artifacts" / "secret.txt").write_text("not for download")
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"weights")
    run_archive_write(final_dir=final, archive=tmp_path / "run" / "model.zip")  # what the run's finish writes
    TrainingRun.objects.filter(pk=world.run.pk).update(
        status=TrainingRun.Status.SUCCEEDED, output_dir=str(tmp_path / "run"), log_tail="step 1"
    )
    return world


@pytest.mark.django_db
def test_downloads_are_attachments_named_by_id(files: World) -> None:
    client = Client()
    client.force_login(files.manager)
    build, run, project = files.build.pk, files.run.pk, files.project.pk
    for url, filename in (
        (f"/datasets/{build}/files/README.md", f"dataset-{build}-README.md"),
        (f"/datasets/{build}/files/pairs-train.jsonl", f"dataset-{build}-pairs-train.jsonl"),
        (f"/training/runs/{run}/files/log.txt", f"run-{run}-log.txt"),
        (f"/training/runs/{run}/files/metrics.json", f"run-{run}-metrics.json"),
        (f"/training/runs/{run}/files/model.zip", f"run-{run}-model.zip"),
        (f"/api/projects/{project}/judgments", f"project-{project}-judgments.jsonl"),
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        assert response["Content-Disposition"] == f'attachment; filename="{filename}"', url


@pytest.mark.django_db
@pytest.mark.parametrize(
    "key",
    [
        "..%2F..%2Fsettings.py",
        "..%2F..%2F..%2Fconfig%2Fsettings.py",
        "..%2Fsecret.txt",
        "%2E%2E%2Fsecret.txt",
        "..%252Fsecret.txt",
        "..",
        "pairs%2Ftrain.jsonl",
        "README.md%00.txt",
        "%2Fetc%2Fpasswd",
        "secret.txt",
    ],
)
def test_a_path_in_a_download_key_is_404(files: World, key: str) -> None:
    client = Client()
    client.force_login(files.manager)
    for prefix in (f"/datasets/{files.build.pk}/files/", f"/training/runs/{files.run.pk}/files/"):
        response = client.get(prefix + key)
        assert response.status_code == 404, prefix + key


def test_no_url_serves_the_upload_or_artifact_folders_by_path() -> None:
    callbacks = {
        f"{pattern.callback.__module__}.{pattern.callback.__name__}"
        for _route, pattern in _patterns(get_resolver().url_patterns)
    }
    assert "django.views.static.serve" not in callbacks
    assert not settings.MEDIA_URL or settings.MEDIA_URL == "/"
    for route, _pattern in _patterns(get_resolver().url_patterns):
        assert not route.startswith(("media/", "uploads/", "artifacts/")), route


def _patterns(patterns: list[Any], prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for pattern in patterns:
        if hasattr(pattern, "url_patterns"):
            found += _patterns(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            found.append((prefix + str(pattern.pattern), pattern))
    return found


# --- code that must not exist ----------------------------------------------------------


def repo_python_files() -> list[Path]:
    skip = {".venv", "var", "node_modules", ".git", "__pycache__"}
    return [
        path for path in sorted(REPO_ROOT.rglob("*.py")) if not skip & set(path.relative_to(REPO_ROOT).parts)
    ]


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _is_true(keyword: ast.keyword) -> bool:
    return isinstance(keyword.value, ast.Constant) and keyword.value.value is True


def test_torch_load_is_never_called_without_weights_only() -> None:
    found = []
    files = repo_python_files()
    assert any(path.parts[-2:] == ("training", "runner.py") for path in files)
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        imports_load = any(
            isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(alias.name == "load" for alias in node.names)
            for node in ast.walk(tree)
        )
        for call in _calls(tree):
            func = call.func
            is_torch_load = (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
            ) or (imports_load and isinstance(func, ast.Name) and func.id == "load")
            if is_torch_load and not any(k.arg == "weights_only" and _is_true(k) for k in call.keywords):
                found.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}")
    assert not found, f"torch.load without weights_only=True (pickles run code): {found}"


def test_no_code_trusts_remote_model_code_or_unpickles() -> None:
    found = []
    for path in repo_python_files():
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            if any(k.arg == "trust_remote_code" and _is_true(k) for k in call.keywords):
                found.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}: trust_remote_code=True")
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr in {"load", "loads"}
                and isinstance(func.value, ast.Name)
                and func.value.id in {"pickle", "cPickle", "dill", "joblib"}
            ):
                found.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}: {func.value.id}.{func.attr}")
    assert not found, found


PASSWORD_NAMES = {"password", "password1", "password2", "new_password", "raw_password"}


def hard_coded_passwords(source: str, filename: str = "<source>") -> list[str]:
    found = []

    def literal(node: ast.AST | None) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value != ""

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in PASSWORD_NAMES and literal(keyword.value):
                    found.append(f"{filename}:{node.lineno}: {keyword.arg}=<literal>")
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "set_password" and node.args and literal(node.args[0]):
                found.append(f"{filename}:{node.lineno}: set_password(<literal>)")
            if name in {"create_user", "create_superuser"} and any(literal(a) for a in node.args[1:]):
                found.append(f"{filename}:{node.lineno}: {name}(…, <literal>)")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if literal(key) and key.value.lower() in PASSWORD_NAMES and literal(value):  # type: ignore[union-attr]
                    found.append(f"{filename}:{node.lineno}: {{{key.value!r}: <literal>}}")  # type: ignore[union-attr]
        if isinstance(node, ast.Assign) and literal(node.value):
            for target in node.targets:
                if (
                    isinstance(target, ast.Name)
                    and "PASSWORD" in target.id.upper()
                    and "VALIDATOR" not in target.id.upper()
                ):
                    found.append(f"{filename}:{node.lineno}: {target.id} = <literal>")
    return found


def test_the_password_check_catches_what_it_is_meant_to_catch() -> None:
    source = """
User.objects.create_superuser("admin", "a@example.com", "admin")
user.set_password("changeme")
User.objects.create_user(username="demo", password="demo")
DEFAULT_ADMIN_PASSWORD = "hunter2"
fixture = {"username": "x", "password": "secret"}
"""
    assert len(hard_coded_passwords(source)) == 5
    assert hard_coded_passwords("user.set_password(password_generate())\nuser_create(password=None)") == []


def test_no_default_credentials_in_settings_migrations_fixtures_or_commands() -> None:
    # Tests may use a known password for their own throwaway users (tests/factories.py); nothing else may.
    found = []
    for path in repo_python_files():
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0] in {"config", *APP_DIRS, "bench"} or relative.name == "manage.py":
            found += hard_coded_passwords(path.read_text(), str(relative))
    for pattern in ("*.json", "*.yaml", "*.yml"):
        for path in REPO_ROOT.glob(f"*/fixtures/{pattern}"):
            text = path.read_text()
            if re.search(r"""["']?password["']?\s*[:=]""", text):
                found.append(f"{path.relative_to(REPO_ROOT)}: a password in a fixture")
    for name in ("Makefile", ".ci/run"):
        path = REPO_ROOT / name
        if path.exists() and re.search(r"(?i)(PASSWORD|passwd)\s*[:=]\s*\S", path.read_text()):
            found.append(f"{name}: a password")
    assert not found, found


def test_demo_passwords_are_generated_never_written_down() -> None:
    # The demo command and user creation draw passwords from password_generate (secrets);
    # tests/test_accounts.py runs demo_users twice and sees new passwords.
    source = (REPO_ROOT / "annotation" / "management" / "commands" / "demo_users.py").read_text()
    assert "password_generate()" in source
    assert hard_coded_passwords(source) == []


# --- a build's and a run's page name no path the person could use ------------------------


@pytest.mark.django_db
def test_build_and_run_json_name_no_server_paths(files: World) -> None:
    client = Client()
    client.force_login(files.manager)
    build = client.get(f"/api/dataset-builds/{files.build.pk}/").json()
    run = client.get(f"/api/training-runs/{files.run.pk}/").json()
    text = json.dumps([build, run])
    files.run.refresh_from_db()
    assert str(settings.ARTIFACTS_DIR) not in text and files.run.output_dir not in text
    assert build["files"] and all(
        file["url"].startswith(f"http://testserver/datasets/{files.build.pk}/files/")
        for file in build["files"]
    )


@pytest.mark.django_db
def test_a_labeler_of_the_project_downloads_nothing(files: World) -> None:
    client = Client()
    client.force_login(user_with_roles(Role.LABELER, username="lab2"))
    assert client.get(f"/datasets/{files.build.pk}/files/README.md").status_code == 404
    assert client.get(f"/training/runs/{files.run.pk}/files/model.zip").status_code == 404
