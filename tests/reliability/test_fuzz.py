"""Hostile input: the judgment service under random answers, and the whole API under schemathesis.

The JSONL import has its own property tests (random lines: every bad line
reported, nothing written): tests/annotation/test_import.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import schemathesis
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from annotation.models import Assignment, Comparison, Judgment, Membership, Task
from annotation.roles import Role
from annotation.selectors import assignment_items_in_display_order
from annotation.services import (
    AssignmentNotActive,
    JudgmentInput,
    JudgmentInvalid,
    assignment_claim_next,
    judgment_submit,
)
from tests.factories import user_with_roles
from tests.training.test_builds_support import project_with_prompts
from training.models import DatasetBuild, TrainingRun

# --- the judgment service ------------------------------------------------------------

# JSON values as a client could send them, plus the Python values a careless door could pass on.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def answers(uids: list[str], flags: list[str]) -> st.SearchStrategy[JudgmentInput]:
    """Answers near the valid ones (right ids, odd values) and far from them (anything JSON)."""
    ids = st.sampled_from(uids) | st.text(max_size=40)
    rank_values = st.integers(min_value=-2, max_value=len(uids) + 2) | json_values
    ranks = st.one_of(
        st.permutations(list(range(1, len(uids) + 1))).map(lambda ranks: dict(zip(uids, ranks, strict=True))),
        st.dictionaries(st.sampled_from(uids), rank_values, max_size=len(uids) + 1),
        st.dictionaries(ids, rank_values, max_size=6),
        json_values,
    )
    likert = st.one_of(
        st.just("consistent"),  # 1–7 ratings that agree with the ranks, filled in below
        st.just({}),
        st.dictionaries(ids, st.integers(min_value=-1, max_value=9) | json_values, max_size=6),
        json_values,
    )
    flag_names = st.sampled_from([*flags, "unknown"]) | st.text(max_size=10)
    flag_map = st.one_of(
        st.just({}),
        st.dictionaries(ids, st.lists(flag_names, max_size=3) | json_values, max_size=4),
        json_values,
    )
    tokens = st.one_of(
        st.text(alphabet="abcXYZ019-_", min_size=1, max_size=64),
        st.text(max_size=80),
        json_values,
    )
    seconds = st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**30), max_value=10**400),
        json_values,
    )

    def consistent(answer: JudgmentInput) -> JudgmentInput:
        if answer.likert != "consistent":
            return answer
        ranks = answer.ranks if isinstance(answer.ranks, dict) else {}
        likert = {uid: 8 - rank for uid, rank in ranks.items() if isinstance(rank, int) and 1 <= rank <= 7}
        return dataclasses.replace(answer, likert=likert)

    extra = {}
    if "strength" in {f.name for f in dataclasses.fields(JudgmentInput)}:  # A/B: how much better
        extra["strength"] = st.none() | st.sampled_from([1, 2]) | json_values
    return st.builds(
        JudgmentInput,
        **extra,
        ranks=ranks,
        client_token=tokens,
        likert=likert,
        flags=flag_map,
        none_acceptable=st.booleans(),  # typed bool, and every door (the serializer) gives one
        rationale=st.text(max_size=50) | st.text(min_size=10_001, max_size=10_002) | json_values,
        active_seconds=seconds,
    ).map(consistent)


def stored_rows() -> tuple[Any, ...]:
    return (
        Judgment.objects.count(),
        Comparison.objects.count(),
        list(Assignment.objects.order_by("pk").values_list("status", flat=True)),
        list(Task.objects.order_by("pk").values_list("judgment_count", flat=True)),
    )


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["ranking", "ab"])
def test_the_judgment_service_takes_any_answer_and_only_ever_refuses_it_cleanly(kind: str) -> None:
    # given a judge holding a task of a ranking project with ties, Likert and flags, or of an A/B session
    if kind == "ranking":
        project = project_with_prompts(
            ["Is this safe?"], name="fuzz", k=3, likert_enabled=True, flags=["harmful"]
        )
    else:
        project = project_with_prompts(
            ["Which is kinder?"], name="fuzz ab", k=2, kind=kind, flags=["harmful"]
        )
    role = Role.LABELER if kind == "ranking" else Role.EVALUATOR
    labeler = user_with_roles(role, username="fuzzer")
    Membership.objects.create(project=project, user=labeler, role=role)
    assignment = assignment_claim_next(project=project, user=labeler)
    assert assignment is not None
    uids = [str(item.completion.uid) for item in assignment_items_in_display_order(assignment=assignment)]
    outcomes: dict[str, int] = {}

    # derandomize: the same examples on every run, so "both sides reached" never depends on luck
    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(answer=answers(uids, list(project.flags)))
    def submit(answer: JudgmentInput) -> None:
        before = stored_rows()
        # each example in a savepoint that is rolled back, so a stored answer does not end the game
        with transaction.atomic():
            try:
                # when
                judgment_submit(assignment=assignment, user=labeler, answer=answer)
            except (JudgmentInvalid, AssignmentNotActive) as error:
                # then a refusal names what is wrong, and nothing was written
                outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
                assert str(error)
                if isinstance(error, JudgmentInvalid):
                    assert error.errors and all(isinstance(m, str) for m in error.errors.values())
                assert stored_rows() == before
            else:
                outcomes["stored"] = outcomes.get("stored", 0) + 1
                judgment = Judgment.objects.get(assignment=assignment)
                assert Comparison.objects.filter(judgment=judgment).count() == (
                    0 if judgment.none_acceptable else math.comb(len(uids), 2)
                )
            transaction.set_rollback(True)
        assignment.refresh_from_db()

    submit()

    # the game reached both sides: refusals and stored answers
    assert outcomes.get("JudgmentInvalid", 0) > 50
    assert outcomes.get("stored", 0) > 0, outcomes


# --- the API under schemathesis ------------------------------------------------------

API_EXAMPLES = 8  # per operation, caller and generation mode: the whole sweep stays well under a minute


@pytest.fixture
def api_world(transactional_db: None) -> dict[str, Any]:
    """A ranking project with a manager and a labeler (tokens), a lease, a finished build and a queued run."""
    project = project_with_prompts(
        [f"Question {n}?" for n in range(4)], name="schemathesis", k=3, flags=["harmful"]
    )
    manager = user_with_roles(Role.MANAGER, username="st-manager")
    labeler = user_with_roles(Role.LABELER, username="st-labeler")
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)
    assignment = assignment_claim_next(project=project, user=labeler)
    assert assignment is not None
    build = DatasetBuild.objects.create(
        name="st build", created_by=manager, status=DatasetBuild.Status.SUCCEEDED
    )
    build.projects.add(project)
    run = TrainingRun.objects.create(name="st run", kind="reward", dataset_build=build, base_model="m")
    return {
        "tokens": {
            "labeler": Token.objects.create(user=labeler).key,
            "manager": Token.objects.create(user=manager).key,
        },
        "ids": {
            "project_id": project.pk,
            "assignment_id": assignment.pk,
            "build_id": build.pk,
            "run_id": run.pk,
        },
    }


def api_sweep(
    operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str], ids: dict[str, int]
) -> int:
    """Run one operation's generated requests through the checks; returns how many were sent."""
    sent = 0

    @settings(
        max_examples=API_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), real=st.booleans())
    def call(case: Any, real: bool) -> None:
        nonlocal sent
        # half the calls name objects that exist, so the access rules and the services run
        if real and case.path_parameters:
            case.path_parameters = {
                name: ids.get(name, value) for name, value in case.path_parameters.items()
            }
        # when
        response = case.call(base_url=base_url, headers=headers)
        sent += 1
        # then
        case.validate_response(
            response, checks=[not_a_server_error, response_schema_conformance], headers=headers
        )

    call()
    return sent


def test_the_api_never_answers_5xx_and_always_as_its_schema_says(
    live_server: Any, api_world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the schema the running server publishes, and a labeler's and a manager's token
    # (builds and runs the fuzzer creates are not sent to a queue: a worker of the suite would take them)
    queued: list[int] = []
    monkeypatch.setattr(
        "training.services.builds.dataset_build_enqueue", lambda *, build: queued.append(build.pk)
    )
    monkeypatch.setattr(
        "training.services.runs.training_run_enqueue", lambda *, run_id: queued.append(run_id)
    )
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    sent = 0

    # when every operation gets valid and invalid requests from both
    for caller, token in api_world["tokens"].items():
        headers = {"Authorization": f"Token {token}"}
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    sent += api_sweep(operation, mode, live_server.url, headers, api_world["ids"])
                except Unsatisfiable:
                    assert mode == GenerationMode.NEGATIVE  # nothing to get wrong in a bare GET of a list
                except (
                    Exception,
                    BaseExceptionGroup,
                ) as error:  # collect every operation's failure, then report them all
                    failures.append(f"{caller} {operation.label} ({mode.value}): {error}")

    # then no answer was a server error or strayed from the schema
    assert not failures, "\n\n".join(failures)
    assert sent > 200
