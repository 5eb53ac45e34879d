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
from annotation.selectors import policies_for_user, projects_for_user
from training.models import DatasetBuild, RewardModel, TrainingRun
from training.rl import TRUE_SCORERS
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


# Settings only an RL run reads (training.runner.RunSpec); other kinds do not send them.
RL_SETTINGS = (
    "rl_num_generations",
    "rl_temperature",
    "rl_max_completion_length",
    "rl_watch_steps",
    "rl_watch_prompts",
    "true_scorer",
)


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
        *RL_SETTINGS,
    )

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
    learning_rate = forms.FloatField(
        label=_("Learning rate"),
        required=False,
        min_value=0,
        help_text=_("Blank: the default for the kind and PEFT method."),
    )
    num_train_epochs = forms.FloatField(label=_("Epochs"), min_value=0.01, initial=1.0)
    max_steps = forms.IntegerField(
        label=_("Steps at most"), initial=-1, help_text=_("-1: as many as the epochs take.")
    )
    per_device_train_batch_size = forms.IntegerField(label=_("Batch size per GPU"), min_value=1, initial=8)
    gradient_accumulation_steps = forms.IntegerField(
        label=_("Gradient accumulation steps"), min_value=1, initial=1
    )
    max_length = forms.IntegerField(
        label=_("Length at most (tokens)"),
        min_value=8,
        initial=512,
        help_text=_("Tokens per prompt and completion."),
    )
    beta = forms.FloatField(
        label=_("Beta"),
        min_value=0,
        initial=0.1,
        help_text=_(
            "DPO and RL: how far the policy may move from where it starts (RL: the KL penalty, e.g. 0.05)."
        ),
    )
    center_rewards_coefficient = forms.FloatField(
        label=_("Reward centring"),
        required=False,
        min_value=0,
        help_text=_("Reward only: pulls rewards towards zero mean (e.g. 0.01)."),
    )
    lora_r = forms.IntegerField(label=_("LoRA rank"), min_value=1, initial=16)
    lora_alpha = forms.IntegerField(label=_("LoRA alpha"), min_value=1, initial=32)
    lora_dropout = forms.FloatField(label=_("LoRA dropout"), min_value=0, max_value=1, initial=0.05)
    seed = forms.IntegerField(label=_("Seed"), min_value=0, initial=0)
    logging_steps = forms.IntegerField(label=_("Log every (steps)"), min_value=1, initial=10)
    save_steps = forms.IntegerField(label=_("Checkpoint every (steps)"), min_value=1, initial=100)
    # --- RL runs -------------------------------------------------------------
    against_reward_model = forms.ModelChoiceField(
        label=_("Reward model"),
        queryset=RewardModel.objects.none(),
        required=False,
        help_text=_("RL only: the trained reward model the policy is optimised against."),
    )
    rl_num_generations = forms.IntegerField(
        label=_("Samples per prompt"),
        min_value=2,
        max_value=64,
        initial=4,
        required=False,
        help_text=_("RL only: completions sampled per prompt; each is compared with the mean of the others."),
    )
    rl_temperature = forms.FloatField(
        label=_("Sampling temperature"),
        min_value=0.01,
        max_value=10,
        initial=1.0,
        required=False,
        help_text=_("RL only: temperature of the sampled completions."),
    )
    rl_max_completion_length = forms.IntegerField(
        label=_("Max completion length"),
        min_value=1,
        max_value=8192,
        initial=64,
        required=False,
        help_text=_("RL only: tokens per sampled completion."),
    )
    rl_watch_steps = forms.IntegerField(
        label=_("Watch every (steps)"),
        min_value=1,
        initial=10,
        required=False,
        help_text=_("RL only: how often held-out prompts are scored for proxy reward against KL."),
    )
    rl_watch_prompts = forms.IntegerField(
        label=_("Watched prompts"),
        min_value=1,
        max_value=1000,
        initial=16,
        required=False,
        help_text=_("RL only: held-out prompts in the watch's fixed sample."),
    )
    true_scorer = forms.ChoiceField(
        label=_("True scorer"),
        choices=[("", _("None"))] + [(name, name) for name in sorted(TRUE_SCORERS)],
        required=False,
        help_text=_(
            "RL only, optional: a known truth that scores the watched samples too (the demo's answers)."
        ),
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["against_reward_model"].queryset = reward_models_for_user(user=user)  # type: ignore[attr-defined]
        self.fields["dataset_build"].queryset = dataset_builds_for_user(user=user).filter(
            status=DatasetBuild.Status.SUCCEEDED
        )
        demo = Path(settings.MODELS_DIR) / "demo-sft"
        self.fields["base_model"].initial = str(demo) if demo.exists() else ""

    def hyperparameters(self) -> dict[str, Any]:
        data = self.cleaned_data
        values = {name: data[name] for name in self.HYPERPARAMETERS if data.get(name) not in (None, "")}
        kind = data.get("kind")
        # Each kind has its own knobs; the others are not sent.
        if kind != TrainingRun.Kind.REWARD:
            values.pop("center_rewards_coefficient", None)
        if kind not in (TrainingRun.Kind.DPO, TrainingRun.Kind.RL):
            values.pop("beta", None)
        if kind != TrainingRun.Kind.RL:
            for name in RL_SETTINGS:
                values.pop(name, None)
        return values

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
