"""The shape of one line of a prompt import (JSON Lines), defined once, as pydantic models.

    {"id": "ext-1", "prompt": "text" | [{"role": "user", "content": "…"}],
     "completions": [{"text": "…", "policy": "name", "gold_rank": 1}], "metadata": {…}}

`PromptLine` is the line, `ChatTurn` a message of a chat prompt, `CompletionLine`
a completion. A null `id`, `completions` or `metadata` counts as absent.
Reference answers and other facts about a prompt travel in `metadata` as they
are (a dataset build reads `metadata["reference"]`); `metadata["gold_ranks"]`
is written by the import from the completions' `gold_rank`, never read from it.

`line_validate` checks one parsed line and returns the model, or every problem
of the line as (field path, message): pydantic collects them all, and the
models word them for people (`prompt[1].role: the last turn must be from the
user, not assistant`), as the import reports them. Values are taken strictly
as JSON gives them: no string becomes a number, no number a string.

What is checked on the raw JSON before a line gets here (annotation.importing):
its bytes, its nesting depth, and that every string can be stored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

MAX_NAME_LENGTH = 200  # Prompt.external_id and Policy.name
GOLD_RANKS_KEY = "gold_ranks"
Role = Literal["system", "user", "assistant"]
MESSAGE_ROLES: tuple[str, ...] = get_args(Role)
# The context key of the completions limit (IMPORT_MAX_COMPLETIONS_PER_PROMPT), a setting read per import.
MAX_COMPLETIONS = "max_completions"
UNKNOWN_FIELD = "unknown_field"
PROMPT_SHAPE = "must be a non-empty string or a list of {role, content} messages"


# -- words for values -----------------------------------------------------------


def json_type(value: Any) -> str:
    """What a JSON value is, as a message names it: 'an integer', 'an array', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def brief(value: Any) -> str:
    """A value quoted for an error message, cut short."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + '…"'
    return json_type(value)


def field_path(path: str, key: str | int) -> str:
    """`path` one step down: `completions[0]`, `prompt[1].role`, `metadata."odd key"`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    name = key if key.isidentifier() else json.dumps(key)[:80]
    return f"{path}.{name}" if path else name


# -- problems ------------------------------------------------------------------

# pydantic's own checks, in the import's words; `{kind}` is what the value was instead.
_BUILTIN_MESSAGES = {
    "missing": "is required",
    "int_type": "must be an integer, not {kind}",
    "list_type": "must be an array, not {kind}",
    "dict_type": "must be an object, not {kind}",
    "prompt_type": f"{PROMPT_SHAPE}, not {{kind}}",
}


def _rule(message: str) -> PydanticCustomError:
    """A broken rule of the format, worded whole (no context: braces in `message` stay as they are)."""
    return PydanticCustomError("import_rule", message)


def _at(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=_rule(message), loc=loc, input=value)


def _carried(error: ValidationError) -> list[InitErrorDetails]:
    """The problems of `error`, to raise again beside others (their type and words kept)."""
    return [
        InitErrorDetails(type=PydanticCustomError(d["type"], d["msg"]), loc=d["loc"], input=d["input"])
        for d in error.errors()
    ]


def _raise(title: str, problems: list[InitErrorDetails]) -> None:
    # A ValidationError raised inside a validator keeps its problems, each at its place below this one.
    if problems:
        raise ValidationError.from_exception_data(title, problems)


# -- values --------------------------------------------------------------------


def _text(*, empty: str, max_length: int | None = None) -> PlainValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _rule(empty)
        if max_length is not None and len(value) > max_length:
            raise _rule(f"must be at most {max_length} characters")
        return value

    return PlainValidator(check, json_schema_input_type=str)


def _external_id(value: Any) -> str:
    # An integer id is kept as its digits: ids are matched as text, as Prompt.external_id stores them.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _rule(f"must be a string or an integer, not {json_type(value)}")
    text = str(value)
    if not text.strip():
        raise _rule("must not be empty (leave it out for no id)")
    if len(text) > MAX_NAME_LENGTH:
        raise _rule(f"must be at most {MAX_NAME_LENGTH} characters")
    return text


def _one_of(choices: tuple[str, ...]) -> PlainValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _rule(f"must be one of {', '.join(choices)}, not {brief(value)}")
        return value

    return PlainValidator(check, json_schema_input_type=str)


Text = Annotated[str, _text(empty="must be a non-empty string")]
PolicyName = Annotated[str, _text(empty="must be a non-empty string", max_length=MAX_NAME_LENGTH)]
ExternalId = Annotated[str, PlainValidator(_external_id, json_schema_input_type=str | int)]


# -- objects -------------------------------------------------------------------


class _Shape(BaseModel):
    """A JSON object of the format: unknown keys are problems, values are taken strictly as JSON gives them.

    Each shape words its own problems from its fields: an unknown key lists
    the fields it has, a value that is not an object names the required ones.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    noun: ClassVar[str]
    # A field's own words for its absence, where "is required" would not say what to add.
    missing_messages: ClassVar[dict[str, str]] = {}
    null_means_absent: ClassVar[tuple[str, ...]] = ()
    field_names: ClassVar[frozenset[str]] = frozenset()  # set once the class is built: read per value

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.field_names = frozenset(cls.model_fields)

    @classmethod
    def not_an_object(cls, value: Any) -> str:
        required = ", ".join(name for name, field in cls.model_fields.items() if field.is_required())
        return f"must be an object {{{required}}}, not {json_type(value)}"

    @classmethod
    def unknown_field(cls) -> str:
        names = list(cls.model_fields)
        return f"unknown field; {cls.noun} has {' and '.join(names) if len(names) == 2 else ', '.join(names)}"

    @model_validator(mode="wrap")
    @classmethod
    def _in_the_format_s_words(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, dict):
            raise _rule(cls.not_an_object(value))
        # Unknown keys are told apart here, not by pydantic, which cannot read a key that is not valid
        # Unicode (a lone surrogate); the problem carries the key as its input, which pydantic keeps as
        # it is, where its place (loc) would lose such a key's characters.
        unknown: list[InitErrorDetails] = []
        if not cls.field_names.issuperset(value):
            problem = PydanticCustomError(UNKNOWN_FIELD, cls.unknown_field())
            unknown = [
                InitErrorDetails(type=problem, loc=(key,), input=key)
                for key in value
                if key not in cls.field_names
            ]
        known = value
        if unknown or any(value.get(key, 0) is None for key in cls.null_means_absent):
            known = {
                key: item
                for key, item in value.items()
                if key in cls.field_names and (item is not None or key not in cls.null_means_absent)
            }
        problems: list[InitErrorDetails] = []
        try:
            model = handler(known)
        except ValidationError as error:
            for problem in _carried(error):
                loc, kind = problem["loc"], problem["type"].type  # type: ignore[union-attr]
                if kind == "missing" and len(loc) == 1 and loc[0] in cls.missing_messages:
                    problem = _at(loc, cls.missing_messages[str(loc[0])], value)
                problems.append(problem)
        # Unknown keys first: a misspelt field explains the "is required" that follows it.
        _raise(cls.__name__, unknown + problems)
        return model


class ChatTurn(_Shape):
    """One message of a chat prompt."""

    noun: ClassVar[str] = "a message"

    role: Annotated[Role, _one_of(MESSAGE_ROLES)]
    content: Text


def _chat(value: list[Any], handler: ValidatorFunctionWrapHandler) -> list[ChatTurn]:
    """At least one turn, each a ChatTurn, the last from the user (the model answers it)."""
    if not value:
        raise _rule("must have at least one message")
    problems: list[InitErrorDetails] = []
    turns: list[ChatTurn] = []
    try:
        turns = handler(value)
    except ValidationError as error:
        problems = _carried(error)
    # Read from the input, so a line whose other turns are wrong still hears about its last one.
    last = value[-1]
    if isinstance(last, dict) and last.get("role") in MESSAGE_ROLES and last["role"] != "user":
        problems.append(
            _at((len(value) - 1, "role"), f"the last turn must be from the user, not {last['role']}", last)
        )
    _raise("chat", problems)
    return turns


class CompletionLine(_Shape):
    """A completion of the line's prompt, from a named policy; optionally its place in a gold ranking."""

    noun: ClassVar[str] = "a completion"
    missing_messages: ClassVar[dict[str, str]] = {
        "text": "must be a non-empty string",
        "policy": 'missing: name the policy that wrote this completion, e.g. "sft-v3"',
    }

    text: Text
    policy: PolicyName
    # Absent is None; a null given is not an integer, and is told so.
    gold_rank: int = Field(default=None)


def _gold_ranking_problems(completions: list[Any]) -> list[InitErrorDetails]:
    """A gold ranking ranks every completion of its line, each 1 (best) to their count, over two or more."""
    if not any(isinstance(completion, dict) and "gold_rank" in completion for completion in completions):
        return []
    count = len(completions)
    problems = []
    for index, completion in enumerate(completions):
        if not isinstance(completion, dict):
            continue
        if "gold_rank" not in completion:
            message = "is required: other completions of this line have a gold_rank"
            problems.append(_at((index, "gold_rank"), message, completion))
            continue
        rank = completion["gold_rank"]  # a rank that is not an integer is CompletionLine's to report
        if isinstance(rank, int) and not isinstance(rank, bool) and not 1 <= rank <= count:
            message = f"must be between 1 and {count} (1 = best), not {rank}"
            problems.append(_at((index, "gold_rank"), message, completion))
    if count < 2:
        problems.append(_at((), "a gold ranking needs at least 2 completions", completions))
    return problems


def _completions(
    value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> list[CompletionLine]:
    limit = (info.context or {}).get(MAX_COMPLETIONS)
    if isinstance(value, list) and limit is not None and len(value) > limit:
        raise _rule(f"has {len(value)} completions; the limit is {limit} (IMPORT_MAX_COMPLETIONS_PER_PROMPT)")
    problems: list[InitErrorDetails] = []
    completions: list[CompletionLine] = []
    try:
        completions = handler(value)
    except ValidationError as error:
        problems = _carried(error)
    if isinstance(value, list):
        # Read from the input, beside each completion's own problems; the ranking is the list's rule.
        problems += _gold_ranking_problems(value)
        # Stable: each completion's problems in field order, then those of the list as a whole.
        problems.sort(key=lambda problem: problem["loc"][0] if problem["loc"] else len(value))
    _raise("completions", problems)
    return completions


TEXT_PROMPT, CHAT_PROMPT = "text", "chat"


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return TEXT_PROMPT
    if isinstance(value, list):
        return CHAT_PROMPT
    return None


# The tag goes last: it marks the validated member, validators included.
Prompt = Annotated[
    Annotated[str, _text(empty="must not be empty"), Tag(TEXT_PROMPT)]
    | Annotated[list[ChatTurn], WrapValidator(_chat), Tag(CHAT_PROMPT)],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message=PROMPT_SHAPE,
    ),
]


class PromptLine(_Shape):
    """One line of the file: a prompt, as text or chat turns, with optional id, completions and metadata."""

    noun: ClassVar[str] = "a line"
    null_means_absent: ClassVar[tuple[str, ...]] = ("id", "completions", "metadata")

    id: ExternalId = ""
    prompt: Prompt
    completions: Annotated[list[CompletionLine], WrapValidator(_completions)] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def not_an_object(cls, value: Any) -> str:
        return f'must be a JSON object {{"prompt": …}}, not {json_type(value)}'

    @field_validator("metadata")
    @classmethod
    def _gold_ranks_are_the_import_s(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        message = "is reserved for the import; put gold_rank on each completion instead"
        _raise("metadata", [_at((GOLD_RANKS_KEY,), message, metadata)] if GOLD_RANKS_KEY in metadata else [])
        return metadata

    @property
    def messages(self) -> list[dict[str, str]] | None:
        """The chat turns as stored (Prompt.messages); None for a text prompt."""
        return None if isinstance(self.prompt, str) else [turn.model_dump() for turn in self.prompt]

    @property
    def gold_ranks(self) -> list[int] | None:
        """The completions' gold ranks in line order, when the line gives a gold ranking."""
        if not self.completions or self.completions[0].gold_rank is None:
            return None
        return [completion.gold_rank for completion in self.completions]


def _path(problem: ErrorDetails) -> str:
    loc = problem["loc"]
    if problem["type"] == UNKNOWN_FIELD:
        loc = (*loc[:-1], problem["input"])
    if len(loc) > 1 and loc[0] == "prompt" and loc[1] in (TEXT_PROMPT, CHAT_PROMPT):
        loc = loc[:1] + loc[2:]  # the discriminator's tag is no field of the file
    path = ""
    for key in loc:
        path = field_path(path, key)
    return path


def _message(problem: ErrorDetails) -> str:
    template = _BUILTIN_MESSAGES.get(problem["type"])
    if template is None:
        return problem["msg"]
    return template.replace("{kind}", json_type(problem["input"]))


def line_validate(document: Any, *, max_completions: int) -> tuple[PromptLine | None, list[tuple[str, str]]]:
    """The line as a PromptLine, or None and every problem of it as (field path, message)."""
    try:
        return PromptLine.model_validate(document, context={MAX_COMPLETIONS: max_completions}), []
    except ValidationError as error:
        return None, [(_path(problem), _message(problem)) for problem in error.errors()]
