"""Import of prompts, with optional completions, from JSON Lines.

One JSON object per line (blank lines are ignored):

    {"id": "ext-1", "prompt": "text" | [{"role": "user", "content": "…"}],
     "completions": [{"text": "…", "policy": "name", "gold_rank": 1}], "metadata": {…}}

The shape of a line, and the words for its problems, are defined once in
annotation.import_format (pydantic models); this module reads the bytes, checks
what is beneath a line's shape (size, UTF-8, JSON, nesting, storable strings)
and what is across lines (repeated ids and prompts). Every problem is reported
as `line N: field: message`.

`prompts_import` works in two steps:

1. Validate, streaming line by line: every problem of every line is collected
   with its line number and field, and only the validated lines are kept, so
   the parsed file is held in memory once.
2. In one transaction, with the project row locked so two imports into the
   same project cannot race on duplicates: check the lines against prompts
   already in the project, then write policies, prompts and completions, then
   build tasks. Any problem raises `ImportValidationError` before anything is
   written.

Gold ranks: when the completions of a line carry `gold_rank`, the prompt's
`metadata["gold_ranks"]` holds the ranks as a list in the line's completion
order, which is also the creation (id) order of the prompt's completions.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from pydantic import TypeAdapter, ValidationError

from annotation.import_format import GOLD_RANKS_KEY, ExternalId, brief, field_path, line_validate
from annotation.models import Completion, Policy, Project, Prompt
from annotation.rendering import completion_text_key
from annotation.services import tasks_create_for_project

MIB = 1024 * 1024

# Defaults of the limits; each can be overridden by a Django setting of the same name.
DEFAULT_LIMITS = {
    "IMPORT_MAX_BYTES": 50 * MIB,
    "IMPORT_MAX_LINE_BYTES": 1 * MIB,
    "IMPORT_MAX_DEPTH": 10,
    "IMPORT_MAX_LINES": 200_000,
    "IMPORT_MAX_COMPLETIONS_PER_PROMPT": 64,
}

# A line with a pathological value (thousands of bad strings) reports this many and a count.
MAX_STRING_ERRORS_PER_LINE = 10
PROGRESS_EVERY_LINES = 1000
DB_BATCH_SIZE = 1000


def import_limit(name: str) -> int:
    """The limit `name` (one of DEFAULT_LIMITS): the Django setting if set, else the default."""
    return int(getattr(settings, name, DEFAULT_LIMITS[name]))


def bytes_display(size: int) -> str:
    """'50 MiB', '1.5 KiB', '100 bytes': sizes as people read them in error messages."""
    for unit, scale in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} byte" if size == 1 else f"{size} bytes"


def prompt_content_hash(prompt: str | list[dict]) -> str:
    """sha256 (hex) of the canonical JSON of a prompt: exact duplicates share it."""
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ImportError_:  # the trailing underscore keeps clear of the builtin ImportError
    """One problem: the line it is on (None for the file as a whole), the field, what is wrong."""

    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = "file" if self.line is None else f"line {self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ImportValidationError(Exception):
    """The input has problems; nothing was written. `.errors` lists every one of them."""

    def __init__(self, errors: list[ImportError_]) -> None:
        self.errors = errors
        super().__init__(errors)  # args stay (errors,) so the exception pickles and re-raises whole

    def __str__(self) -> str:
        count = len(self.errors)
        heading = f"{count} problem{'' if count == 1 else 's'} in the import; nothing was imported:"
        return "\n".join([heading, *(str(error) for error in self.errors)])


@dataclass
class ImportReport:
    prompts_created: int = 0
    completions_created: int = 0
    policies_created: int = 0
    # (line number, why it was skipped)
    duplicates: list[tuple[int, str]] = field(default_factory=list)
    tasks_created: int = 0
    # Lines with K completions or more but fewer than K different texts: no task yet.
    repeated_texts: list[int] = field(default_factory=list)
    # (line number, why its prompt got no task) for every new prompt left without one.
    without_task: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _CompletionRow:
    text: str
    policy: str


@dataclass(frozen=True)
class _PromptRow:
    """A validated line, ready to write."""

    line: int
    external_id: str
    text: str
    messages: list[dict[str, str]] | None
    metadata: dict[str, Any]
    completions: tuple[_CompletionRow, ...]
    content_hash: str


# -- parsing ------------------------------------------------------------------


class _JSONRejected(ValueError):
    """JSON that the standard library accepts but an import must not."""


def _reject_constant(name: str) -> Any:
    raise _JSONRejected(f"{name} is not allowed (NaN and Infinity are not JSON numbers)")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):  # 1e999 parses to inf
        raise _JSONRejected(f"the number {literal[:40]} is too large")
    return number


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _JSONRejected(f"the key {json.dumps(key)[:80]} appears twice in one object")
            seen.add(key)
    return result


def _json_loads(text: str) -> Any:
    return json.loads(
        text,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
        object_pairs_hook=_object_without_duplicate_keys,
    )


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (a lone \\ud800–\\udfff escape), which is not valid Unicode"
    return None


def _structure_errors(line: int, document: dict[str, Any], max_depth: int) -> tuple[list[ImportError_], bool]:
    """Strings (keys too) that cannot be stored, and whether nesting is deeper than `max_depth`.

    Iterative, so a hostile document cannot exhaust the stack here. Too deep a
    document reports that alone: its fields are not worth reading further.
    """
    errors: list[ImportError_] = []
    string_errors = 0
    # (value, its parent's path, its key there, depth): a path is spelt out only where it is needed.
    stack: list[tuple[Any, str, str | int | None, int]] = [(document, "", None, 1)]
    while stack:
        value, parent, key, depth = stack.pop()
        if isinstance(value, str):
            problem = _string_problem(value)
            if problem:
                string_errors += 1
                if string_errors <= MAX_STRING_ERRORS_PER_LINE:
                    path = parent if key is None else field_path(parent, key)
                    errors.append(ImportError_(line, path or "(key)", problem))
            continue
        if not isinstance(value, dict | list):
            continue
        path = parent if key is None else field_path(parent, key)
        if depth > max_depth:
            message = (
                f"nested too deeply: more than {max_depth} levels of arrays and objects (IMPORT_MAX_DEPTH)"
            )
            return [ImportError_(line, path, message)], True
        if isinstance(value, dict):
            for child_key, child in value.items():
                problem = _string_problem(child_key)
                if problem:
                    string_errors += 1
                    if string_errors <= MAX_STRING_ERRORS_PER_LINE:
                        errors.append(ImportError_(line, field_path(path, child_key), f"the key {problem}"))
                stack.append((child, path, child_key, depth + 1))
        else:
            stack.extend((child, path, index, depth + 1) for index, child in enumerate(value))
    if string_errors > MAX_STRING_ERRORS_PER_LINE:
        more = string_errors - MAX_STRING_ERRORS_PER_LINE
        errors.append(ImportError_(line, "", f"and {more} more strings with the same problems"))
    return errors, False


# -- validating one line ----------------------------------------------------


def _validate_document(line: int, document: Any) -> tuple[_PromptRow | None, str, list[ImportError_]]:
    """The row to write (None if the line has problems), the line's valid id or '', and its problems."""
    errors: list[ImportError_] = []
    if isinstance(document, dict):
        errors, too_deep = _structure_errors(line, document, import_limit("IMPORT_MAX_DEPTH"))
        if too_deep:
            return None, "", errors
    parsed, problems = line_validate(
        document, max_completions=import_limit("IMPORT_MAX_COMPLETIONS_PER_PROMPT")
    )
    errors.extend(ImportError_(line, path, message) for path, message in problems)
    if parsed is None:
        return None, _valid_id(document), errors
    if errors:
        return None, parsed.id, errors
    metadata = dict(parsed.metadata)
    if parsed.gold_ranks is not None:
        metadata[GOLD_RANKS_KEY] = parsed.gold_ranks
    messages = parsed.messages
    row = _PromptRow(
        line=line,
        external_id=parsed.id,
        text=parsed.prompt if isinstance(parsed.prompt, str) else "",
        messages=messages,
        metadata=metadata,
        completions=tuple(_CompletionRow(text=c.text, policy=c.policy) for c in parsed.completions),
        content_hash=prompt_content_hash(parsed.prompt if messages is None else messages),
    )
    return row, parsed.id, []


_EXTERNAL_ID = TypeAdapter(ExternalId)


def _valid_id(document: Any) -> str:
    """The id of a line with problems, if the id itself is good ('' if not): later lines may not reuse it."""
    if not isinstance(document, dict) or document.get("id") is None:
        return ""
    try:
        return _EXTERNAL_ID.validate_python(document["id"])
    except ValidationError:
        return ""


# -- reading the stream -----------------------------------------------------


@dataclass
class _Validation:
    rows: list[_PromptRow] = field(default_factory=list)
    errors: list[ImportError_] = field(default_factory=list)
    duplicates: list[tuple[int, str]] = field(default_factory=list)


def _raw_lines(stream: IO[bytes], errors: list[ImportError_]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the line break) per line; None for a line over the length limit.

    Stops, with an error in `errors`, once the file is over the size limit.
    """
    max_bytes = import_limit("IMPORT_MAX_BYTES")
    max_line = import_limit("IMPORT_MAX_LINE_BYTES")
    total = 0
    number = 0
    while True:
        # One byte over the limit tells a too-long line apart; the line break itself does not count.
        chunk = stream.readline(max_line + 2)
        if not chunk:
            return
        number += 1
        total += len(chunk)
        content = chunk.removesuffix(b"\n").removesuffix(b"\r")
        too_long = len(content) > max_line
        # Skip the rest of a long line without holding it.
        while too_long and not chunk.endswith(b"\n") and total <= max_bytes:
            chunk = stream.readline(64 * 1024)
            if not chunk:
                break
            total += len(chunk)
        if total > max_bytes:
            errors.append(
                ImportError_(
                    None,
                    "",
                    f"the file is larger than the {bytes_display(max_bytes)} limit (IMPORT_MAX_BYTES); "
                    f"split it into smaller files",
                )
            )
            return
        if too_long:
            errors.append(
                ImportError_(
                    number,
                    "",
                    f"the line is longer than the {bytes_display(max_line)} limit (IMPORT_MAX_LINE_BYTES)",
                )
            )
            yield number, None
        else:
            yield number, content


def _validate_stream(stream: IO[bytes], progress: Callable[[int], None] | None) -> _Validation:
    result = _Validation()
    errors = result.errors
    max_lines = import_limit("IMPORT_MAX_LINES")
    first_line_of_hash: dict[str, int] = {}
    first_line_of_id: dict[str, int] = {}
    records = 0
    unreported = 0
    for number, content in _raw_lines(stream, errors):
        unreported += 1
        if progress is not None and unreported >= PROGRESS_EVERY_LINES:
            progress(unreported)
            unreported = 0
        if content is None:
            continue
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as error:
            errors.append(
                ImportError_(
                    number,
                    "",
                    f"is not valid UTF-8 (byte 0x{content[error.start]:02x} at byte {error.start + 1}); "
                    "save the file as UTF-8",
                )
            )
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte order mark some editors write
        if not text.strip():
            continue
        records += 1
        if records > max_lines:
            errors.append(
                ImportError_(
                    number,
                    "",
                    f"the file has more than {max_lines} prompt lines, the limit (IMPORT_MAX_LINES); "
                    "split it into smaller files",
                )
            )
            break
        try:
            document = _json_loads(text)
        except RecursionError:
            errors.append(
                ImportError_(
                    number, "", "nested too deeply: arrays and objects inside each other without end"
                )
            )
            continue
        except _JSONRejected as error:
            errors.append(ImportError_(number, "", f"is not accepted JSON: {error}"))
            continue
        except json.JSONDecodeError as error:
            errors.append(ImportError_(number, "", f"is not valid JSON: {error.msg} (column {error.colno})"))
            continue
        except ValueError as error:  # e.g. an integer with more digits than Python converts
            errors.append(ImportError_(number, "", f"is not valid JSON: {error}"))
            continue
        row, external_id, line_errors = _validate_document(number, document)
        errors.extend(line_errors)
        if row is None:
            if external_id:
                first_line_of_id.setdefault(external_id, number)
            continue
        if row.content_hash in first_line_of_hash:
            result.duplicates.append(
                (number, f"same prompt as line {first_line_of_hash[row.content_hash]}; skipped")
            )
            continue
        if external_id and external_id in first_line_of_id:
            errors.append(
                ImportError_(
                    number,
                    "id",
                    f"{brief(external_id)} is already used on line {first_line_of_id[external_id]}",
                )
            )
            continue
        first_line_of_hash[row.content_hash] = number
        if external_id:
            first_line_of_id[external_id] = number
        result.rows.append(row)
    if progress is not None and unreported:
        progress(unreported)
    return result


# -- writing ------------------------------------------------------------------

_T = TypeVar("_T")


def _batches(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _rows_new_to_project(project: Project, validation: _Validation) -> list[_PromptRow]:
    """The rows whose prompt the project lacks; existing prompts become duplicates, taken ids errors."""
    existing_by_hash: dict[str, tuple[int, str]] = {}
    existing_by_id: dict[str, int] = {}
    for batch in _batches(validation.rows, DB_BATCH_SIZE):
        hashes = [row.content_hash for row in batch]
        for pk, content_hash, external_id in Prompt.objects.filter(
            project=project, content_hash__in=hashes
        ).values_list("pk", "content_hash", "external_id"):
            existing_by_hash[content_hash] = (pk, external_id)
        ids = [row.external_id for row in batch if row.external_id]
        if ids:
            existing_by_id.update(
                Prompt.objects.filter(project=project, external_id__in=ids).values_list("external_id", "pk")
            )
    new_rows = []
    for row in validation.rows:
        if row.content_hash in existing_by_hash:
            pk, external_id = existing_by_hash[row.content_hash]
            named = f" (id {brief(external_id)})" if external_id else ""
            validation.duplicates.append(
                (row.line, f"same prompt as prompt {pk}{named} in the project; skipped")
            )
        elif row.external_id in existing_by_id:
            validation.errors.append(
                ImportError_(
                    row.line,
                    "id",
                    f"{brief(row.external_id)} is already used in this project "
                    f"by prompt {existing_by_id[row.external_id]}",
                )
            )
        else:
            new_rows.append(row)
    return new_rows


def _policies_for(project: Project, names: set[str]) -> tuple[dict[str, Policy], int]:
    """Policies by name, creating the missing ones as imported; and how many were created.

    A policy of another kind with the same name is used as it is when it is
    already one of the project's: an import may bring more outputs of a model
    the project already knows. One that is not would reach into another
    project's models (its paths, and generating with it): the import is refused.
    Every policy named becomes one of the project's (Policy.projects).
    """
    policies = {policy.name: policy for policy in Policy.objects.filter(name__in=names)}
    foreign = sorted(
        name
        for name, policy in policies.items()
        if policy.kind != Policy.Kind.IMPORTED and not policy.projects.filter(pk=project.pk).exists()
    )
    if foreign:
        raise ImportValidationError(
            [
                ImportError_(
                    None,
                    "completions",
                    f"policy {name!r} is a model policy this project does not have; "
                    "name the outputs' source differently",
                )
                for name in foreign
            ]
        )
    created = 0
    for name in sorted(names - policies.keys()):
        policies[name], was_created = Policy.objects.get_or_create(
            name=name, defaults={"kind": Policy.Kind.IMPORTED}
        )
        created += was_created
    project.policies.add(*policies.values())
    return policies, created


def _write(project: Project, rows: list[_PromptRow], report: ImportReport) -> dict[int, int]:
    """Write the rows; returns each new prompt's line, by prompt id."""
    lines: dict[int, int] = {}
    policies, report.policies_created = _policies_for(
        project, {completion.policy for row in rows for completion in row.completions}
    )
    for batch in _batches(rows, DB_BATCH_SIZE):
        prompts = Prompt.objects.bulk_create(
            [
                Prompt(
                    project=project,
                    external_id=row.external_id,
                    text=row.text,
                    messages=row.messages,
                    metadata=row.metadata,
                    content_hash=row.content_hash,
                )
                for row in batch
            ]
        )
        # In line order, so metadata["gold_ranks"] lines up with the completions' id order.
        completions = Completion.objects.bulk_create(
            [
                Completion(prompt=prompt, policy=policies[completion.policy], text=completion.text)
                for prompt, row in zip(prompts, batch, strict=True)
                for completion in row.completions
            ],
            batch_size=DB_BATCH_SIZE,
        )
        report.prompts_created += len(prompts)
        report.completions_created += len(completions)
        lines.update((prompt.pk, row.line) for prompt, row in zip(prompts, batch, strict=True))
    return lines


def prompts_import(
    *,
    project: Project,
    data: bytes | IO[bytes],
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import prompts (and their completions) from JSON Lines into `project`, all or nothing.

    `progress`, if given, is called with the number of lines read since its
    previous call (so `tqdm.update` fits). Exact duplicate prompts, in the
    file or already in the project, are skipped and listed in the report, as
    are the lines left without a task because their completions repeat a text.
    Raises ImportValidationError listing every problem; then nothing is written.
    """
    stream: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    validation = _validate_stream(stream, progress)
    report = ImportReport()
    with transaction.atomic():
        # Locking the project serialises imports into it, so the duplicate check below holds at write.
        list(Project.objects.select_for_update(no_key=True).filter(pk=project.pk).values_list("pk"))
        rows = _rows_new_to_project(project, validation)
        if validation.errors:
            # sorted() is stable: the errors of one line keep their field order.
            raise ImportValidationError(
                sorted(validation.errors, key=lambda error: (error.line is None, error.line or 0))
            )
        validation.rows = []  # the rows to write are in `rows`; let the rest go
        lines = _write(project, rows, report)
        report.duplicates = sorted(validation.duplicates)
        report.tasks_created = tasks_create_for_project(project=project)
        # A new prompt with K completions is left without a task only when they all hold one text.
        # (Bounded by id rather than listing the ids: SQLite caps a query's parameters.)
        waiting = (
            Prompt.objects.filter(project=project, pk__gte=min(lines, default=0), tasks__isnull=True)
            .annotate(completion_count=Count("completions"))
            .filter(completion_count__gte=project.k)
            .values_list("pk", flat=True)
        )
        report.repeated_texts = sorted(lines[pk] for pk in waiting if pk in lines)
        report.without_task = _prompts_without_task(project, lines)
    return report


def _prompts_without_task(project: Project, lines: dict[int, int]) -> list[tuple[int, str]]:
    """(line, why) for each new prompt the task builder left without a task."""
    texts: dict[int, list[str]] = {}
    untasked = Prompt.objects.filter(project=project, pk__gte=min(lines, default=0), tasks__isnull=True)
    for pk in untasked.values_list("pk", flat=True):
        if pk in lines:
            texts[pk] = []
    for prompt_id, text in Completion.objects.filter(prompt_id__in=list(texts)).values_list(
        "prompt_id", "text"
    ):
        texts[prompt_id].append(text)
    reasons = []
    for pk, completions in texts.items():
        different = len({completion_text_key(text) for text in completions})
        if not completions:
            reason = "no completions yet"
        elif len(completions) < project.k:
            count = len(completions)
            reason = f"{count} completion{'' if count == 1 else 's'}; a task needs K={project.k}"
        elif different < 2:
            reason = f"one text in all {len(completions)} completions: nothing to rank"
        else:
            reason = "no task was made"
        reasons.append((lines[pk], reason))
    return sorted(reasons)
