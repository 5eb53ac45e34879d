"""Forms of the training side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils.translation import gettext_lazy as _

from annotation.models import Policy, Project
from annotation.roles import Role
from annotation.selectors import projects_for_user
from training.models import DatasetBuild, RewardModel, TrainingRun
from training.selectors import (
    BUILD_OPTION_FIELDS,
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

    def service_arguments(self) -> dict[str, Any]:
        """The cleaned values as `dataset_build_create` takes them."""
        data = self.cleaned_data
        return {
            "name": data["name"],
            "projects": list(data["projects"]),
            "labelers": list(data["labelers"]),
            **{field: data[field] for field in BUILD_OPTION_FIELDS},
        }


class TrainingRunForm(forms.Form):
    """A run's settings with sane defaults: named, typed fields, never a raw JSON box.

    Blank optional fields fall back to the defaults of `training.runner.RunSpec`
    for the chosen kind and PEFT method; `clean()` validates the whole spec as
    the run process will, so a bad combination is refused here, not mid-run.
    """

    HYPERPARAMETERS = (
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "beta",
        "center_rewards_coefficient",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "seed",
        "logging_steps",
        "save_steps",
    )

    name = forms.CharField(max_length=200, required=False, help_text=_("Leave blank for an automatic name."))
    kind = forms.ChoiceField(choices=TrainingRun.Kind.choices, initial=TrainingRun.Kind.REWARD)
    dataset_build = forms.ModelChoiceField(queryset=DatasetBuild.objects.none())
    base_model = forms.CharField(
        max_length=500, help_text=_("A local folder or hub id of a causal language model (the SFT policy).")
    )
    peft = forms.ChoiceField(
        label=_("PEFT method"), choices=TrainingRun.Peft.choices, initial=TrainingRun.Peft.LORA
    )
    trainer = forms.ChoiceField(
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
    learning_rate = forms.FloatField(
        required=False, min_value=0, help_text=_("Blank: the default for the kind and PEFT method.")
    )
    num_train_epochs = forms.FloatField(min_value=0.01, initial=1.0)
    max_steps = forms.IntegerField(initial=-1, help_text=_("-1: as many as the epochs take."))
    per_device_train_batch_size = forms.IntegerField(min_value=1, initial=8)
    gradient_accumulation_steps = forms.IntegerField(min_value=1, initial=1)
    max_length = forms.IntegerField(
        min_value=8, initial=512, help_text=_("Tokens per prompt and completion.")
    )
    beta = forms.FloatField(min_value=0, initial=0.1, help_text=_("DPO only: how far the policy may move."))
    center_rewards_coefficient = forms.FloatField(
        required=False, min_value=0, help_text=_("Reward only: pulls rewards towards zero mean (e.g. 0.01).")
    )
    lora_r = forms.IntegerField(min_value=1, initial=16)
    lora_alpha = forms.IntegerField(min_value=1, initial=32)
    lora_dropout = forms.FloatField(min_value=0, max_value=1, initial=0.05)
    seed = forms.IntegerField(min_value=0, initial=0)
    logging_steps = forms.IntegerField(min_value=1, initial=10)
    save_steps = forms.IntegerField(min_value=1, initial=100)

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["dataset_build"].queryset = dataset_builds_for_user(user=user).filter(
            status=DatasetBuild.Status.SUCCEEDED
        )
        demo = Path(settings.MODELS_DIR) / "demo-sft"
        self.fields["base_model"].initial = str(demo) if demo.exists() else ""

    def hyperparameters(self) -> dict[str, Any]:
        data = self.cleaned_data
        values = {name: data[name] for name in self.HYPERPARAMETERS if data.get(name) is not None}
        # Each kind has its own knob; the other one is not sent.
        values.pop(
            "beta" if data.get("kind") == TrainingRun.Kind.REWARD else "center_rewards_coefficient", None
        )
        return values


class ABSessionForm(forms.Form):
    """A blind A/B session: policies compared on the prompts of a project the manager runs."""

    name = forms.CharField(max_length=200)
    source_project = forms.ModelChoiceField(
        queryset=Project.objects.none(), help_text=_("Its prompts are the ones the policies answer.")
    )
    policies = forms.ModelMultipleChoiceField(
        queryset=Policy.objects.all(), widget=forms.CheckboxSelectMultiple, help_text=_("Two or more.")
    )
    votes_per_pair = forms.IntegerField(
        min_value=1, max_value=50, initial=1, help_text=_("Votes wanted per prompt and pair of policies.")
    )
    max_new_tokens = forms.IntegerField(
        min_value=1, max_value=8192, initial=256, help_text=_("For outputs that must be generated first.")
    )
    seed = forms.IntegerField(min_value=0, initial=0)
    reward_model = forms.ModelChoiceField(
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

    def clean_policies(self) -> Any:
        policies = self.cleaned_data["policies"]
        if len(policies) < 2:
            raise forms.ValidationError(_("Pick at least two policies."))
        return policies


class ScoringJobForm(forms.Form):
    """Attach a reward model to an A/B session: it scores the session's completions on the gpu queue."""

    reward_model = forms.ModelChoiceField(
        queryset=RewardModel.objects.none(),
        help_text=_("Reward models trained on data from projects you manage."),
    )

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reward_model"].queryset = reward_models_for_user(user=user)  # type: ignore[attr-defined]
