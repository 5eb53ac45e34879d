"""Shapes of the JSON API's requests and responses (types only; rules live in services)."""

from __future__ import annotations

from rest_framework import serializers

from annotation.models import Project
from annotation.services import MAX_RATIONALE, JudgmentInput


class ProjectSerializer(serializers.ModelSerializer):
    your_roles = serializers.SerializerMethodField()

    class Meta:
        model = Project
        fields = [
            "id",
            "name",
            "kind",
            "instructions",
            "k",
            "overlap",
            "ties_allowed",
            "likert_enabled",
            "flags",
            "rationale_required",
            "lease_minutes",
            "is_active",
            "your_roles",
        ]

    def get_your_roles(self, project: Project) -> list[str]:
        return sorted(self.context["roles_by_project"].get(project.pk, ()))


class PromptMessageSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField()


class AssignmentPromptSerializer(serializers.Serializer):
    text = serializers.CharField(allow_blank=True)
    messages = PromptMessageSerializer(many=True, allow_null=True)


class AssignmentCompletionSerializer(serializers.Serializer):
    id = serializers.UUIDField(help_text="Opaque id; use it as the key of ranks, likert and flags.")
    label = serializers.CharField(help_text="Display letter in this person's order: A, B, C…")
    text = serializers.CharField()


class AssignmentSettingsSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=Project.Kind.choices)
    k = serializers.IntegerField()
    ties_allowed = serializers.BooleanField()
    likert_enabled = serializers.BooleanField()
    flags = serializers.ListField(child=serializers.CharField())
    rationale_required = serializers.BooleanField()


class AssignmentSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    project = serializers.IntegerField()
    status = serializers.CharField()
    lease_expires_at = serializers.DateTimeField()
    prompt = AssignmentPromptSerializer()
    completions = AssignmentCompletionSerializer(many=True, help_text="In this person's display order.")
    settings = AssignmentSettingsSerializer()


class JudgmentRequestSerializer(serializers.Serializer):
    ranks = serializers.DictField(
        child=serializers.IntegerField(), help_text="Completion id → rank; 1 is best, equal ranks are a tie."
    )
    likert = serializers.DictField(child=serializers.IntegerField(), required=False, default=dict)
    flags = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), required=False, default=dict
    )
    none_acceptable = serializers.BooleanField(required=False, default=False)
    rationale = serializers.CharField(required=False, allow_blank=True, default="", max_length=MAX_RATIONALE)
    active_seconds = serializers.FloatField(required=False, allow_null=True, default=None)
    strength = serializers.IntegerField(
        required=False, allow_null=True, default=None, help_text="A/B only: 1 slightly, 2 clearly better."
    )
    client_token = serializers.CharField(
        max_length=64,
        help_text="Chosen by the client for this answer; a retry with the same token is a no-op.",
    )

    def to_answer(self) -> JudgmentInput:
        data = self.validated_data
        return JudgmentInput(
            ranks=dict(data["ranks"]),
            likert=dict(data["likert"]),
            flags={uid: list(names) for uid, names in data["flags"].items()},
            none_acceptable=data["none_acceptable"],
            rationale=data["rationale"],
            active_seconds=data["active_seconds"],
            strength=data["strength"],
            client_token=data["client_token"],
        )


class GoldFeedbackSerializer(serializers.Serializer):
    expected = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="Completion id -> the gold rank; 1 is best, equal ranks a tie.",
    )
    matched = serializers.BooleanField(help_text="Every pair of completions has the gold outcome.")


class JudgmentResponseSerializer(serializers.Serializer):
    judgment = serializers.IntegerField()
    comparisons = serializers.IntegerField()
    created = serializers.BooleanField(help_text="False when this client token was already stored.")
    gold = GoldFeedbackSerializer(
        required=False,
        help_text="Only on a gold task of a project that shows labelers the expected ranking afterwards.",
    )


class ProblemSerializer(serializers.Serializer):
    """Every error of the API: RFC 9457 problem details, served as application/problem+json."""

    type = serializers.CharField(help_text="urn:rankwise:problem:<slug>, one per kind of problem.")
    title = serializers.CharField(help_text="The same for every problem of this type.")
    status = serializers.IntegerField(help_text="The HTTP status, repeated.")
    detail = serializers.CharField(help_text="What went wrong this time, for people.")
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="On a validation problem: field -> messages.",
    )


class ConflictSerializer(ProblemSerializer):
    """A 409: the answer was not stored; it is sent back so the person does not lose it."""

    reason = serializers.ChoiceField(choices=["taken_over", "submitted", "skipped"])
    your_answer = serializers.DictField(help_text="The answer as sent.")


class SkipRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=500)


class ImportErrorSerializer(serializers.Serializer):
    line = serializers.IntegerField(allow_null=True)
    field = serializers.CharField()
    message = serializers.CharField()


class ImportFailureSerializer(ProblemSerializer):
    """A refused import: `errors` by field, and `lines` with every bad line's number (nothing was written).

    `lines` is there when the file was read and some lines were refused; a
    request refused before that (no file, a wrong format) has only `errors`.
    """

    lines = ImportErrorSerializer(many=True, required=False)


class ImportReportSerializer(serializers.Serializer):
    prompts_created = serializers.IntegerField()
    completions_created = serializers.IntegerField()
    policies_created = serializers.IntegerField()
    tasks_created = serializers.IntegerField()
    duplicates = serializers.ListField(child=serializers.DictField())
    repeated_texts = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="Lines whose completions hold fewer than K different texts: no task was made.",
    )
    without_task = serializers.ListField(
        child=serializers.DictField(),
        help_text="Each new prompt left without a task: its line and why (too few completions or texts).",
    )


class ImportRequestSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="JSONL: one prompt per line.")
