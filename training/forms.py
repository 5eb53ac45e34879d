"""Forms of the training side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils.translation import gettext_lazy as _

from annotation.models import Policy, Project
from annotation.roles import Role
from annotation.selectors import policies_for_user, projects_for_user
from training.models import DatasetBuild, RewardModel, TrainingRun
from training.run_settings import FORM_SETTINGS, RL, RunSetting, run_settings_for_kind
from training.selectors import (
    BUILD_LABELS,
    BUILD_OPTION_FIELDS,
    BUILD_OPTIONAL_FIELDS,
    build_options_from,
    dataset_builds_for_user,
    labeler_choices_for_builds,
    project_choices_for_builds,
    reward_models_for_user,
)


class DatasetBuildForm(forms.ModelForm):
    """A new dataset build: its projects (those the user manages), filters and options."""

    class Meta:
        model = DatasetBuild
        fields = ["name", "projects", "labelers", *BUILD_OPTION_FIELDS]
        labels = BUILD_LABELS
        widgets = {
            "projects": forms.CheckboxSelectMultiple,
            "labelers": forms.SelectMultiple(attrs={"size": 6}),
            "date_from": forms.DateInput(attrs={"type": "date"}),
            "date_to": forms.DateInput(attrs={"type": "date"}),
        }

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        projects = self.fields["projects"]
        labelers = self.fields["labelers"]
        assert isinstance(projects, forms.ModelMultipleChoiceField)
        assert isinstance(labelers, forms.ModelMultipleChoiceField)
        projects.queryset = project_choices_for_builds(user=user)
        labelers.queryset = labeler_choices_for_builds(user=user)
        for name in BUILD_OPTIONAL_FIELDS:
            self.fields[name].required = False

    def service_arguments(self) -> dict[str, Any]:
        """The cleaned values as `dataset_build_create` takes them."""
        data = self.cleaned_data
        return {
            "name": data["name"],
            "projects": list(data["projects"]),
            "labelers": list(data["labelers"]),
            **build_options_from(data),
        }


def _setting_validator(setting: RunSetting) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        problem = setting.problem(value)
        if problem:
            raise forms.ValidationError(problem)

    return check


def _setting_field(setting: RunSetting) -> forms.Field:
    """The form field of a run setting: its type, bounds, default and words, all from RUN_SETTINGS.

    Inclusive bounds are the field's own (Django's translated messages); a
    setting with a strict bound or an extra allowed value (max_steps' -1) is
    checked by its own rule, which then words every bound.
    A setting that not every kind reads, or without a default, may be left
    blank: the run spec's default for the kind then holds.
    """
    # The words are marked for the catalog in training.run_settings; here they are translated when shown.
    common: dict[str, Any] = {
        "label": _(setting.label),
        "help_text": _(setting.help) if setting.help else "",
        "required": setting.every_kind and setting.default is not None and not setting.nullable,
        "initial": setting.default,
    }
    if setting.choices:
        choices = [(value, value) if value else ("", _("None")) for value in setting.choices]
        return forms.ChoiceField(choices=choices, **common)
    field_class = forms.IntegerField if setting.type is int else forms.FloatField
    if setting.strict:
        return field_class(validators=[_setting_validator(setting)], **common)
    return field_class(min_value=setting.minimum, max_value=setting.maximum, **common)


# The run settings' fields, derived; TrainingRunForm adds the run's own fields and orders them all.
_RunSettingsForm = type(
    "_RunSettingsForm", (forms.Form,), {setting.name: _setting_field(setting) for setting in FORM_SETTINGS}
)


class TrainingRunForm(_RunSettingsForm):  # type: ignore[valid-type,misc]
    """A run's settings with sane defaults: named, typed fields, never a raw JSON box.

    The settings' fields come from `training.run_settings.FORM_SETTINGS`.
    Blank optional fields fall back to the defaults of `training.runner.RunSpec`
    for the chosen kind and PEFT method; the service validates the whole spec
    as the run process will, so a bad combination is refused here, not mid-run.
    """

    HYPERPARAMETERS = tuple(setting.name for setting in FORM_SETTINGS)

    name = forms.CharField(
        label=_("Name"), max_length=200, required=False, help_text=_("Leave blank for an automatic name.")
    )
    kind = forms.ChoiceField(
        label=_("Kind"), choices=TrainingRun.Kind.choices, initial=TrainingRun.Kind.REWARD
    )
    dataset_build = forms.ModelChoiceField(label=_("Dataset build"), queryset=DatasetBuild.objects.none())
    base_model = forms.CharField(
        label=_("Base model"),
        max_length=500,
        help_text=_("A local folder or hub id of a causal language model (the SFT policy)."),
    )
    peft = forms.ChoiceField(
        label=_("PEFT method"), choices=TrainingRun.Peft.choices, initial=TrainingRun.Peft.LORA
    )
    trainer = forms.ChoiceField(
        label=_("Trainer"),
        choices=TrainingRun.Trainer.choices,
        initial=TrainingRun.Trainer.GROUPED,
        required=False,
        help_text=_("Grouped is the fast default; TRL's own trainers are the baseline."),
    )
    gpus = forms.IntegerField(
        label=_("GPUs"),
        min_value=1,
        initial=1,
        help_text=_("One process per GPU; at most the GPUs each GPU worker owns."),
    )
    distributed = forms.ChoiceField(
        label=_("Multi-GPU strategy"),
        choices=TrainingRun.Distributed.choices,
        initial=TrainingRun.Distributed.DDP,
        required=False,
        help_text=_("How several GPUs share the run. DeepSpeed needs requirements-gpu.txt on the workers."),
    )
    against_reward_model = forms.ModelChoiceField(
        label=_("Reward model"),
        queryset=RewardModel.objects.none(),
        required=False,
        help_text=_("RL only: the trained reward model the policy is optimised against."),
    )

    # The run's own fields, the settings every kind reads or some do, then the RL ones after their reward model.
    field_order = [
        "name",
        "kind",
        "dataset_build",
        "base_model",
        "peft",
        "trainer",
        "gpus",
        "distributed",
        *(setting.name for setting in FORM_SETTINGS if setting.kinds != (RL,)),
        "against_reward_model",
    ]

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["against_reward_model"].queryset = reward_models_for_user(user=user)  # type: ignore[attr-defined]
        self.fields["dataset_build"].queryset = dataset_builds_for_user(user=user).filter(
            status=DatasetBuild.Status.SUCCEEDED
        )
        demo = Path(settings.MODELS_DIR) / "demo-sft"
        self.fields["base_model"].initial = str(demo) if demo.exists() else ""

    def hyperparameters(self) -> dict[str, Any]:
        """The settings given, for the chosen kind only: each kind has its own knobs; the others are not sent."""
        data = self.cleaned_data
        values = {name: data[name] for name in self.HYPERPARAMETERS if data.get(name) not in (None, "")}
        return run_settings_for_kind(values, data.get("kind") or "")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("kind") == TrainingRun.Kind.RL and not data.get("against_reward_model"):
            self.add_error("against_reward_model", _("An RL run needs a trained reward model."))
        if data.get("kind") != TrainingRun.Kind.RL:
            data["against_reward_model"] = None
        return data


class ABSessionForm(forms.Form):
    """A blind A/B session: policies compared on the prompts of a project the manager runs."""

    name = forms.CharField(label=_("Name"), max_length=200)
    source_project = forms.ModelChoiceField(
        label=_("Source project"),
        queryset=Project.objects.none(),
        help_text=_("Its prompts are the ones the policies answer."),
    )
    policies = forms.ModelMultipleChoiceField(
        label=_("Policies"),
        queryset=Policy.objects.none(),
        widget=forms.CheckboxSelectMultiple,
        help_text=_("Two or more."),
    )
    votes_per_pair = forms.IntegerField(
        label=_("Votes per pair"),
        min_value=1,
        max_value=50,
        initial=1,
        help_text=_("Votes wanted per prompt and pair of policies."),
    )
    max_new_tokens = forms.IntegerField(
        label=_("New tokens at most"),
        min_value=1,
        max_value=8192,
        initial=256,
        help_text=_("For outputs that must be generated first."),
    )
    seed = forms.IntegerField(label=_("Seed"), min_value=0, initial=0)
    reward_model = forms.ModelChoiceField(
        label=_("Reward model"),
        queryset=RewardModel.objects.none(),
        required=False,
        help_text=_(
            "Optional: once the session exists, this reward model scores both sides of every pair "
            "and the results show how often it agrees with the votes."
        ),
    )

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["source_project"].queryset = projects_for_user(user=user, role=Role.MANAGER)  # type: ignore[attr-defined]
        self.fields["reward_model"].queryset = reward_models_for_user(user=user)  # type: ignore[attr-defined]
        self.fields["policies"].queryset = policies_for_user(user=user).order_by("name")  # type: ignore[attr-defined]

    def clean_policies(self) -> Any:
        policies = self.cleaned_data["policies"]
        if len(policies) < 2:
            raise forms.ValidationError(_("Pick at least two policies."))
        return policies


class ScoringJobForm(forms.Form):
    """Attach a reward model to an A/B session: it scores the session's completions on the gpu queue."""

    reward_model = forms.ModelChoiceField(
        label=_("Reward model"),
        queryset=RewardModel.objects.none(),
        help_text=_("Reward models trained on data from projects you manage."),
    )

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reward_model"].queryset = reward_models_for_user(user=user)  # type: ignore[attr-defined]


class PolicyRegisterForm(forms.Form):
    """A model policy from a local folder or a hub id; `training.policies.policy_register` checks it loads."""

    name = forms.CharField(
        label=_("Name"),
        max_length=200,
        required=False,
        help_text=_("Leave blank to take the folder's or hub id's last part."),
    )
    base_model = forms.CharField(
        max_length=500,
        label=_("Base model"),
        help_text=_("A folder on the server (a saved causal language model) or a hub id such as org/model."),
    )
    adapter = forms.CharField(
        max_length=500, required=False, label=_("Adapter"), help_text=_("Optional: a PEFT adapter folder.")
    )
    prompt_format = forms.ChoiceField(
        label=_("Prompt format"),
        choices=[
            ("auto", _("Automatic: chat prompts through the model's chat template, others as text")),
            ("chat", _("Chat: every prompt through the chat template")),
            ("text", _("Plain text")),
        ],
        initial="auto",
        help_text=_("How the policy reads prompts when it generates."),
    )
    projects = forms.ModelMultipleChoiceField(
        label=_("Projects"),
        queryset=Project.objects.none(),
        widget=forms.CheckboxSelectMultiple,
        help_text=_("The projects the policy is for: their managers see it and may use it."),
    )

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        managed = projects_for_user(user=user, role=Role.MANAGER).order_by("name")
        self.fields["projects"].queryset = managed  # type: ignore[attr-defined]
        if "projects" not in self.initial and len(managed[:2]) == 1:
            self.initial["projects"] = list(managed)


class GenerationJobNewForm(forms.Form):
    """A policy writes completions for every prompt of a project the manager runs."""

    policy = forms.ModelChoiceField(queryset=Policy.objects.none(), label=_("Policy"))
    project = forms.ModelChoiceField(
        queryset=Project.objects.none(),
        label=_("Project"),
        help_text=_("Every prompt of this project gets completions; a ranking project gets tasks from them."),
    )
    n = forms.IntegerField(
        min_value=1, max_value=64, initial=4, label=_("Completions per prompt"), help_text=_("From 1 to 64.")
    )
    temperature = forms.FloatField(min_value=0.01, max_value=5, initial=1.0, label=_("Temperature"))
    top_p = forms.FloatField(min_value=0.01, max_value=1, initial=1.0, label=_("Top-p"))
    max_new_tokens = forms.IntegerField(
        min_value=1, max_value=8192, initial=256, label=_("New tokens at most")
    )
    seed = forms.IntegerField(min_value=0, initial=0, label=_("Seed"))

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["policy"].queryset = (  # type: ignore[attr-defined]
            policies_for_user(user=user).exclude(kind=Policy.Kind.IMPORTED).order_by("name")
        )
        self.fields["project"].queryset = projects_for_user(user=user, role=Role.MANAGER).order_by("name")  # type: ignore[attr-defined]
