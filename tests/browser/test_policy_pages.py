"""A manager registers a policy on its page in real Chromium: checked by loading its config and tokenizer,
registered for their project, and never shown another manager's policies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from annotation.models import Policy, Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles
from tests.training.test_policies import tiny_policy_model

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _patient_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test machine may be far busier than a server: the check gets the time it needs here.
    monkeypatch.setattr("training.policies.PROBE_TIMEOUT_S", 300)


@pytest.fixture(scope="module")
def chat_less_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose tokenizer has no chat template: fine for plain text, refused for chat."""
    folder = tiny_policy_model(tmp_path_factory.mktemp("policy-page") / "plain-llama")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def test_a_policy_is_registered_for_the_managers_project_once_it_loads_and_others_stay_out_of_sight(
    open_page, live_server, chat_less_model, tmp_path
):
    # given a manager of one project, and another manager's project with its own policy
    manager = user_with_roles(Role.MANAGER, username="host")
    project = Project.objects.create(name="arithmetic")
    add_member(project, manager, Role.MANAGER)
    theirs = Project.objects.create(name="their prefs")
    add_member(theirs, user_with_roles(Role.MANAGER, username="otis"), Role.MANAGER)
    hidden = Policy.objects.create(name="their-sft", base_model="/models/their-sft")
    hidden.projects.add(theirs)
    page, watch = open_page(manager)

    # when they open Policies from Manage: their project is the only one offered, and chosen
    page.goto(f"{live_server.url}/manage/")
    page.click("#manage-links >> text=Policies")
    page.wait_for_selector("#policy-register")
    assert page.locator("#policy-register input[name=projects]").count() == 1
    assert page.is_checked(f"#policy-register input[name=projects][value='{project.pk}']")
    assert "their-sft" not in page.content() and "their prefs" not in page.content()

    # a folder that is not there is refused, saying so
    page.fill("#id_base_model", str(tmp_path / "nowhere"))
    page.click("#policy-register button[type=submit]")
    page.wait_for_selector("[data-field-error=base_model]")
    assert "does not exist on this server" in page.inner_text("[data-field-error=base_model]")

    # a model whose tokenizer has no chat template is refused for chat prompts, saying why
    page.fill("#id_name", "plain sft")
    page.fill("#id_base_model", str(chat_less_model))
    page.select_option("#id_prompt_format", "chat")
    page.click("#policy-register button[type=submit]")
    page.wait_for_selector("[data-field-error=base_model]")
    assert "has no chat template, but the prompt format is Chat" in page.inner_text(
        "[data-field-error=base_model]"
    )
    assert not Policy.objects.filter(name="plain sft").exists()

    # as plain text it loads, and is registered for the manager's project and listed with it
    page.select_option("#id_prompt_format", "text")
    page.click("#policy-register button[type=submit]")
    page.wait_for_selector("tr[data-policy='plain sft']")
    assert "its config and tokenizer load" in page.inner_text("main")
    policy = Policy.objects.get(name="plain sft")
    assert list(policy.projects.all()) == [project]
    assert "arithmetic" in page.inner_text("tr[data-policy='plain sft']")
    assert page.locator("tr[data-policy]").count() == 1  # their-sft is not listed

    # and its Generate link offers it, not the other manager's policy, for the manager's project
    page.click("tr[data-policy='plain sft'] >> text=Generate")
    page.wait_for_selector("#generation-new")
    options = page.locator("#id_policy option").all_inner_texts()
    assert "plain sft" in options and "their-sft" not in options
    assert watch.errors == []
    shutil.rmtree(tmp_path, ignore_errors=True)
