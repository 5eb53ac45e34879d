"""Registering a policy: its config and tokenizer load with transformers, offline, or the page says what is wrong.

The models are tiny Llama and Gemma configs with trained tokenizers
(tests/training/modern_models.py) and a placeholder weights file: the check
never loads weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from annotation.models import Policy, Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles
from training.policies import PROBE, policy_base_model_problems

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _patient_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test machine may be far busier than a server: the check gets the time it needs here.
    monkeypatch.setattr("training.policies.PROBE_TIMEOUT_S", 300)


def tiny_policy_model(folder: Path, family: str = "llama") -> Path:
    """A saved model without weights worth loading: config, tokenizer (with a chat template), an empty safetensors."""
    from tests.training.modern_models import model_config, tokenizer_build

    folder.mkdir(parents=True)
    tokenizer = tokenizer_build(family)
    tokenizer.save_pretrained(folder)
    model_config(family, tokenizer).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good Llama and Gemma folder, and one broken copy of the Llama per way of being broken."""
    root = tmp_path_factory.mktemp("policy-models")
    llama = tiny_policy_model(root / "llama")
    gemma = tiny_policy_model(root / "gemma", "gemma")

    def broken(name: str, change: Any) -> Path:
        folder = root / name
        shutil.copytree(llama, folder)
        change(folder)
        return folder

    def config_with(**values: Any) -> Any:
        def change(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **values}))

        return change

    def without_chat_template(folder: Path) -> None:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))

    return {
        "llama": llama,
        "gemma": gemma,
        "unknown_architecture": broken("unknown-arch", config_with(model_type="zorblax")),
        "not_causal": broken("t5", config_with(model_type="t5")),
        "remote_code": broken(
            "remote", config_with(model_type="house", auto_map={"AutoConfig": "house.HouseConfig"})
        ),
        "broken_tokenizer": broken(
            "bad-tokenizer", lambda folder: (folder / "tokenizer.json").write_text('{"model": ')
        ),
        "no_chat_template": broken("no-chat", without_chat_template),
        "no_config": broken("no-config", lambda folder: (folder / "config.json").unlink()),
        "no_tokenizer": broken("no-tokenizer", lambda folder: (folder / "tokenizer.json").unlink()),
        "no_weights": broken("no-weights", lambda folder: (folder / "model.safetensors").unlink()),
    }


@pytest.fixture
def manager_of() -> Any:
    def make(name: str = "maria", project_name: str = "prefs") -> tuple[Any, Project]:
        manager = user_with_roles(Role.MANAGER, username=name)
        project = Project.objects.create(name=project_name)
        add_member(project, manager, Role.MANAGER)
        return manager, project

    return make


def _register(user: Any, **data: Any) -> Any:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/policies/")
    values = {"name": "", "adapter": "", "prompt_format": "auto", **data}
    return client.post("/policies/", {**values, "csrfmiddlewaretoken": client.cookies["csrftoken"].value})


def test_a_model_whose_config_and_tokenizer_load_is_registered_for_the_chosen_project(models, manager_of):
    manager, project = manager_of()

    response = _register(
        manager, base_model=str(models["llama"]), prompt_format="chat", projects=[project.pk]
    )

    assert response.status_code == 302
    policy = Policy.objects.get(name="llama")
    assert policy.kind == Policy.Kind.MODEL and policy.base_model == str(models["llama"].resolve())
    assert list(policy.projects.all()) == [project]
    assert policy.generation_settings == {"prompt_format": "chat"}


def test_the_check_loads_with_transformers_in_a_child_without_torch(models):
    # The web process never imports transformers; the child it starts loads the config and
    # tokenizer with it, and leaves torch out (no weights are loaded).
    answer = (
        subprocess.run(
            [sys.executable, "-I", str(PROBE), json.dumps({"model": str(models["gemma"]), "chat": True})],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert json.loads(answer) == {
        "problem": None,
        "detail": "",
        "model_type": "gemma",
        "chat_template": True,
        "torch_loaded": False,
    }


@pytest.mark.parametrize(
    ("model", "chat", "says"),
    [
        ("unknown_architecture", False, "names the model type “zorblax”, an architecture this server"),
        ("not_causal", False, "is a “t5” model, not a causal language model"),
        ("remote_code", False, "needs its own Python code to load (trust_remote_code)"),
        ("broken_tokenizer", False, "does not load: "),
        ("no_chat_template", True, "has no chat template, but the prompt format is Chat"),
    ],
)
def test_what_transformers_refuses_is_named(models, model, chat, says):
    problems = policy_base_model_problems(str(models[model]), chat=chat)
    assert len(problems) == 1 and says in problems[0], problems


def test_a_tokenizer_without_a_chat_template_is_fine_for_plain_text(models):
    assert policy_base_model_problems(str(models["no_chat_template"]), chat=False) == []


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda models, tmp: tmp / "nowhere", "does not exist on this server"),
        (lambda models, tmp: models["no_config"], "has no config.json"),
        (lambda models, tmp: models["no_tokenizer"], "has no tokenizer"),
        (lambda models, tmp: models["no_weights"], "has no weights"),
    ],
)
def test_missing_files_are_named_on_the_page_and_nothing_is_registered(
    models, manager_of, tmp_path, make, says
):
    manager, project = manager_of()

    response = _register(manager, name="x", base_model=str(make(models, tmp_path)), projects=[project.pk])

    assert response.status_code == 400
    assert says in response.content.decode()
    assert not Policy.objects.exists()


def test_a_hub_id_loads_from_the_local_cache_only(models, manager_of, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    manager, project = manager_of()

    missing = _register(manager, base_model="org/model", projects=[project.pk])
    assert missing.status_code == 400
    assert "is not in this server&#x27;s Hugging Face cache" in missing.content.decode()

    # a snapshot in the cache, as huggingface_hub lays it out, is found by transformers offline
    repo = tmp_path / "hub" / "models--org--model"
    shutil.copytree(models["llama"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    cached = _register(manager, base_model="org/model", projects=[project.pk])
    assert cached.status_code == 302, cached.content.decode()[-2000:]
    assert Policy.objects.get(name="model").base_model == "org/model"


def test_a_policy_is_registered_only_for_projects_the_manager_runs(models, manager_of):
    manager, project = manager_of()
    _other_manager, theirs = manager_of("otis", "theirs")

    for projects in ([], [theirs.pk], [project.pk, theirs.pk]):
        response = _register(manager, base_model=str(models["no_weights"]), projects=projects)
        assert response.status_code == 400
        assert "projects" in response.context["form"].errors
    assert not Policy.objects.exists()


def test_a_manager_lists_and_uses_only_the_policies_of_their_projects(manager_of):
    manager, project = manager_of()
    _other_manager, theirs = manager_of("otis", "theirs")
    mine = Policy.objects.create(name="my-sft", base_model="/models/mine")
    mine.projects.add(project)
    hidden = Policy.objects.create(name="their-sft", base_model="/models/theirs")
    hidden.projects.add(theirs)
    shared = Policy.objects.create(name="shared-sft", base_model="/models/shared")
    shared.projects.add(project, theirs)
    client = Client()
    client.force_login(manager)

    listing = client.get("/policies/").content.decode()
    assert "my-sft" in listing and "shared-sft" in listing
    assert "their-sft" not in listing and "/models/theirs" not in listing
    assert "theirs" not in listing  # the shared policy shows the manager's own project only
    offered = client.get("/generation/").context["form"].fields["policy"].queryset
    assert set(offered) == {mine, shared}
    job = {"policy": hidden.pk, "project": project.pk, "n": 1, "temperature": 1, "top_p": 1}
    refused = client.post("/generation/", {**job, "max_new_tokens": 8, "seed": 0})
    assert refused.status_code == 400 and "policy" in refused.context["form"].errors


def test_the_admin_adds_a_policy_with_the_same_check_and_for_the_managers_projects_only(models, manager_of):
    manager, project = manager_of()
    _other_manager, theirs = manager_of("otis", "theirs")
    client = Client()
    client.force_login(manager)
    form = {"kind": "model", "adapter": "", "generation_settings": "{}"}

    add = client.get("/admin/annotation/policy/add/")
    assert add.status_code == 200
    assert set(add.context["adminform"].form.fields["projects"].queryset) == {project}

    refused = client.post(
        "/admin/annotation/policy/add/",
        {**form, "name": "t5", "base_model": str(models["not_causal"]), "projects": [project.pk]},
    )
    assert refused.status_code == 200
    assert "not a causal language model" in str(refused.context["adminform"].form.errors["base_model"])
    elsewhere = client.post(
        "/admin/annotation/policy/add/",
        {**form, "name": "x", "base_model": str(models["llama"]), "projects": [theirs.pk]},
    )
    assert elsewhere.status_code == 200 and "projects" in elsewhere.context["adminform"].form.errors
    assert not Policy.objects.exists()

    added = client.post(
        "/admin/annotation/policy/add/",
        {**form, "name": "sft", "base_model": str(models["llama"]), "projects": [project.pk]},
    )
    assert added.status_code == 302
    assert list(Policy.objects.get(name="sft").projects.all()) == [project]


def test_the_data_migrations_attach_each_existing_policy_to_the_projects_that_use_it():
    import importlib

    from django.apps import apps

    from tests.training.test_builds_support import project_with_prompts
    from training.models import DatasetBuild, GenerationJob, TrainingRun

    annotation_step = importlib.import_module("annotation.migrations.0016_policy_projects")
    training_step = importlib.import_module("training.migrations.0016_policy_projects")
    # given policies from before projects were recorded: outputs, an A/B session, a job, a run
    ranking = project_with_prompts(["One?"], name="ranking", k=2)
    session = Project.objects.create(name="session", kind=Project.Kind.AB, k=2)
    jobs = Project.objects.create(name="jobs")
    imported = Policy.objects.get(name="policy-0")
    compared = Policy.objects.create(name="compared")
    session.ab_policies.add(compared)
    writer = Policy.objects.create(name="writer", base_model="/models/w")
    GenerationJob.objects.create(policy=writer, project=jobs)
    trained = Policy.objects.create(name="dpo-1", base_model="/models/d")
    build = DatasetBuild.objects.create(name="b", status=DatasetBuild.Status.SUCCEEDED)
    build.projects.add(ranking)
    TrainingRun.objects.create(
        name="r", kind=TrainingRun.Kind.DPO, dataset_build=build, base_model="m", policy=trained
    )
    Policy.projects.through.objects.all().delete()

    # when the migrations' data steps run
    annotation_step.policies_join_projects_of_their_outputs(apps, None)
    training_step.policies_join_projects_of_their_jobs_and_builds(apps, None)
    training_step.policies_join_projects_of_their_jobs_and_builds(apps, None)  # twice: no duplicates

    # then each belongs to the projects that used it
    assert list(imported.projects.all()) == [ranking]
    assert list(compared.projects.all()) == [session]
    assert list(writer.projects.all()) == [jobs]
    assert list(trained.projects.all()) == [ranking]
    assert Policy.objects.filter(projects__isnull=True).count() == 0


def test_a_manager_of_no_project_is_told_to_create_one_first():
    manager = user_with_roles(Role.MANAGER, username="new")
    client = Client()
    client.force_login(manager)
    page = client.get("/policies/").content.decode()
    assert 'id="policy-no-project"' in page and 'href="/manage/projects/new"' in page


def test_a_check_that_takes_too_long_says_so_instead_of_holding_the_request(models, monkeypatch):
    monkeypatch.setattr("training.policies.PROBE_TIMEOUT_S", 0.01)
    problems = policy_base_model_problems(str(models["llama"]))
    assert problems == [
        f"Loading the config and tokenizer of {models['llama']} took more than 0 s; try again."
    ]
