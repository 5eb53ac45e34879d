"""Dataset builds: comparisons into reproducible, TRL-ready preference datasets.

Runs on a worker only (it imports numpy and pyarrow, and datasets for the
`hf/` folder); `training.services.dataset_build_run` calls `dataset_build_write`.

What a build reads
    The comparisons (for pairs) and judgments (for grouped, SFT and reference
    rows) of the build's projects that pass its filters: created on or between
    `date_from` and `date_to` (whole days in TIME_ZONE), judged by one of
    `labelers` (when any are chosen), by someone whose gold accuracy in that
    project is not below `min_gold_accuracy` (people without gold answers are
    kept), and no newer than the newest judgment when the build began, so its
    passes agree while people keep judging. With `exclude_flagged` a vote
    is dropped when its judge flagged either completion. Judgments marked
    "none acceptable" rank nothing and yield no rows.

How votes become pair rows (`pairs/`, and `pairs_with_ties/` with ties=keep)
    Comparisons stream from the database ordered by (prompt, unordered
    completion pair, id), so one pair's votes are together and memory holds
    one group at a time.

    every_vote: each comparison is its own row, in that order.

    majority: one row per (prompt, unordered pair {a, b}). With n_a votes for
    a over b, n_b for b over a and n_t ties among the pair's n votes:
      - ties=drop: ties are votes for neither side but still count in n. The
        row says a over b when n_a > n_b and n_a / n ≥ agreement_threshold
        (b over a likewise); otherwise (n_a = n_b, or too small a share) the
        pair yields no row.
      - ties=keep: a tie is a third outcome. The outcome with strictly the
        most votes wins when its share of n reaches the threshold; a winning
        tie is a tie row. No unique winner, or too small a share: no row.
    The row's margin is the mean margin of the winning votes.

    dawid_skene: one row per (prompt, pair) as with majority, but the outcome
    is the one Dawid–Skene (crowd-kit) finds most probable once each
    labeler's confusion between outcomes has been estimated from all the
    votes, so a careless labeler counts for less than a careful one; the row
    is kept when that outcome's posterior reaches agreement_threshold. The
    card lists each labeler's estimated reliability. (pair_labels_dawid_skene)

A text shown twice in one task
    Tasks are made with K different texts (`completion_text_key`: equal after
    NFC and trimming the ends), but older tasks may show one text twice, and
    a ranking of a text against itself is no preference. Within each such
    task the first copy in task order stands for the text and the later
    copies are left out of every output: their comparisons give no pair row
    (in `pairs/`, `hf/` and `pairs_with_ties/` alike, not even a tie), and
    grouped, SFT and reference rows read the judgment without them, as if the
    task had shown the text once. Task order, not the judge's ranks, picks
    the copy, so merging favours no side. The card counts the tasks, the
    comparisons and the judged completions concerned.

Ties
    drop (default): tie votes never become rows. keep: tie rows (`tie: true`,
    margin 0; the pair in task order, or in completion-id order for a majority
    tie) are written to `pairs_with_ties/`, with every preference row
    (`tie: false`). The TRL files (`pairs/`, `hf/`)
    never hold ties, whatever the option: TRL has no tie label. Grouped rows
    keep equal ranks either way.

Margins
    none: no `margin` column. rank_gap: rank(rejected) − rank(chosen) from the
    judgment. likert_gap: likert(chosen) − likert(rejected) from the judgment;
    votes without Likert ratings are dropped. TRL's RewardTrainer uses the
    column as its margin term; DPOTrainer ignores it.

Split by prompt, no near-duplicate on both sides
    1. Every prompt of the build's projects is normalised (casefold,
       punctuation to spaces, whitespace collapsed; for chat prompts, the
       non-system turns) and reduced to a MinHash signature (128 hashes) of
       its word bigrams. (Bigrams, not longer shingles: prompts are short, and
       one changed word in a 15-word prompt still leaves a similarity of 0.75.)
    2. Locality-sensitive hashing (42 bands of 3 rows) proposes candidate
       pairs; a candidate whose estimated Jaccard similarity reaches
       `near_duplicate_threshold` is unioned into one group. Identical
       normalised texts always share a group.
    3. A group goes to test when sha256("seed:key") read as a fraction of
       2^64 is below `test_fraction`, where the key is the smallest hash of
       its members' normalised texts. Sizes are close to `test_fraction`
       rather than exact, and a prompt keeps its side as new data arrives.

Outputs (each as `<output>/train.jsonl`, `test.jsonl` and the same in Parquet)
    pairs: prompt, chosen, rejected [, margin]: TRL's preference format.
    pairs_with_ties (ties=keep): the same rows plus ties, with `tie`.
    grouped: one row per judgment: prompt, completions (task order), ranks
        [, likert with likert_gap]; flagged completions removed with
        exclude_flagged; rows where fewer than two completions are left, or
        all are tied, are dropped.
    sft: prompt, completion: TRL's prompt-completion format. every_vote: the
        top-ranked completion of each judgment; majority: per prompt, the
        completion ranked top by the most judgments, kept when its share of
        the prompt's judgments reaches the threshold. A judgment with a tie
        at the top votes for none; one whose top is flagged (exclude_flagged)
        does not vote. A prompt whose metadata carries a "reference" answer
        also gets one row with the reference as its completion.
        sft_in_preferences (on by default) keeps SFT and preference rows on
        the same prompts. Off: each training near-duplicate group is drawn
        to one side (sha256 of the seed and its key, as for the test split,
        half and half): its prompts give SFT rows only, or pair, grouped and
        reference rows only. Test prompts give both. The card's options say which.
    reference (when a prompt's metadata has a "reference" answer): the
        reference as chosen against each judged completion of the prompt.
    hf/: `datasets.DatasetDict` (train/test) of the pairs, save_to_disk.
    README.md: the dataset card: every option, counts, split sizes, tie
        rate, agreement and margin distribution.

Formats
    standard: strings. A text prompt keeps its text with trailing whitespace
    replaced by one newline; a chat prompt is rendered as "User: …" turns
    separated by blank lines, ending "Assistant:\\n" (a newline ends the
    prompt on a token boundary, so prompt + completion tokenize as prompt
    then completion). conversational: prompt = list of {role, content};
    chosen/rejected/completion = [{"role": "assistant", "content": …}].

One pass
    Comparisons, judgments and the prompts' texts stream in prompt order and
    are walked side by side (rows_write): each prompt's pair rows, then its
    grouped, SFT and reference rows, every output written once from that
    pass. A writer holds a batch of rows as values and JSON lines; each
    batch becomes one Arrow table built column by column (a repeated text
    converted once) for Parquet and hf/, and one block of JSON Lines.

Memory
    Comparisons and judgments stream from server-side cursors. What is held
    is one (prompt, pair) group of votes, one prompt's judgments and texts, a
    Parquet batch (PARQUET_BATCH_ROWS) per open file, and, per prompt of the
    projects, a MinHash signature (512 bytes) for the split: memory grows
    with the number of prompts, not with the number of comparisons. The
    later copies of repeated texts are found in one streamed pass over the
    judged tasks' completions, and only those copies are held. (The
    gold-accuracy filter loads each project's judgments once, through
    `annotation.stats.gold_accuracy`.)

Reproducibility
    Rows are ordered by database keys, Parquet row groups have a fixed size,
    the split depends on the seed and the texts only, and neither the data
    files nor the card hold a timestamp or the build's id or name: the same
    options over the same comparisons write the same bytes. content_hash is
    the sha256 over the JSONL files (sorted by path) and then the card.
    Everything is written into a temporary folder that is renamed into place
    at the end: a failed build leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import unicodedata
import uuid
import warnings
from collections import Counter, namedtuple
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from django.db import connections
from django.db.models import QuerySet
from django.db.models.functions import Greatest, Least

from annotation.models import Comparison, Completion, Judgment, Prompt, TaskCompletion
from annotation.rendering import completion_text_key
from training.judges import dataset_build_judges
from training.models import DatasetBuild
from training.prompts import Rendered, completion_render, prompt_render
from training.selectors import (
    BUILD_OUTPUTS,
    BUILD_SPLITS,
    CARD_FILENAME,
    dataset_build_comparisons,
    dataset_build_dir,
    dataset_build_excluded_labelers,
    dataset_build_judgment_id_max,
    dataset_build_judgments,
    datasets_root,
)

ProgressCallback = Callable[[float], None]

CHUNK_SIZE = 2000  # rows fetched per round trip from the database cursor


def _comparisons_read(**selection: Any) -> QuerySet[Comparison]:
    """The comparisons the build's filters select, less those of judgments rejected in review.

    A rejected judgment is kept for audit (annotation.review) but is no data.
    """
    return dataset_build_comparisons(**selection).exclude(judgment__review=Judgment.Review.REJECTED)


def _judgments_read(**selection: Any) -> QuerySet[Judgment]:
    """The judgments behind those comparisons, less those rejected in review."""
    return dataset_build_judgments(**selection).exclude(review=Judgment.Review.REJECTED)


# Columns read as JSON text and decoded here (once per distinct value: a judgment's six comparisons share them).
_JSON_COLUMN_SUFFIXES = ("ranks", "likert", "flags", "messages", "metadata__reference")
_JSON_CACHE_ENTRIES = 20_000


def _json_loads(text: str) -> Any:
    """What Django's JSONField gives for a value read from the database."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _rows_fast(queryset: QuerySet[Any], *, small: bool = False) -> Generator[Any, None, None]:
    """The rows of a `values_list(..., named=True)` queryset, read straight off a server-side cursor.

    The same values Django's iterator gives (uuids as text, JSON decoded) at a
    fraction of its cost per row: no converter calls, uuids loaded as text by
    the driver, and each distinct JSON text decoded once (the comparisons of
    one judgment repeat its ranks and flags). Decoded values are shared
    between rows: read them, never change them. `small`: a result read at
    once with a plain cursor (a server-side cursor costs round trips).
    """
    query = queryset.query
    names = [*query.extra_select, *query.values_select, *query.annotation_select]
    fields = getattr(queryset, "_fields", None) or names
    connection = connections[queryset.db]
    if connection.vendor != "postgresql" or list(fields) != names:
        yield from queryset.iterator(chunk_size=CHUNK_SIZE)
        return
    import psycopg.types.string

    row_class = namedtuple("Row", names)  # type: ignore[misc]
    json_columns = [i for i, name in enumerate(names) if name.endswith(_JSON_COLUMN_SUFFIXES)]
    decoded: dict[str, Any] = {}
    sql, params = query.get_compiler(using=queryset.db).as_sql()
    with connection.cursor() if small else connection.chunked_cursor() as cursor:
        cursor.cursor.adapters.register_loader("uuid", psycopg.types.string.TextLoader)
        cursor.execute(sql, params)
        make = row_class._make
        while chunk := cursor.fetchmany(CHUNK_SIZE):
            if len(decoded) > _JSON_CACHE_ENTRIES:
                decoded.clear()
            for raw in chunk:
                if json_columns:
                    values = list(raw)
                    for column in json_columns:
                        text = values[column]
                        if text is not None:
                            value = decoded.get(text)
                            if value is None:
                                value = decoded[text] = _json_loads(text)
                            values[column] = value
                    yield make(values)
                else:
                    yield make(raw)


PARQUET_BATCH_ROWS = 5000  # rows per Parquet row group (fixed: part of the bytes)
JSONL_BLOCK_LINES = 500  # JSON lines written at once: few writes, and a batch's text is not held twice
PROGRESS_EVERY_JUDGMENTS = 2000

SHINGLE_WORDS = 2
MINHASH_PERMUTATIONS = 128
# 42 bands of 3 rows (126 of the 128 hashes): a pair at similarity 0.5 is a candidate with
# probability 0.996, one at 0.2 with 0.29, so candidates stay few and misses rare.
MINHASH_BANDS = 42
MINHASH_ROWS = 3
# Fixed, so signatures never depend on the build's options.
MINHASH_SEED = 0x5EED_F00D

# Progress shares of the build's stages.
PROGRESS_PROMPTS = 0.05
PROGRESS_ROWS_END = 0.9


# --- options ---------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """A build's options as plain values, read once from the row."""

    aggregation: str
    agreement_threshold: float
    ties: str
    margin: str
    format: str
    test_fraction: float
    seed: int
    near_duplicate_threshold: float
    exclude_flagged: bool
    sft_in_preferences: bool = True

    @classmethod
    def from_build(cls, build: DatasetBuild) -> BuildOptions:
        return cls(
            aggregation=build.aggregation,
            agreement_threshold=build.agreement_threshold,
            ties=build.ties,
            margin=build.margin,
            format=build.format,
            test_fraction=build.test_fraction,
            seed=build.seed,
            near_duplicate_threshold=build.near_duplicate_threshold,
            exclude_flagged=build.exclude_flagged,
            sft_in_preferences=build.sft_in_preferences,
        )

    @property
    def conversational(self) -> bool:
        return self.format == DatasetBuild.Format.CONVERSATIONAL

    @functools.cached_property
    def majority(self) -> bool:
        """One row per (prompt, pair) and one SFT row per prompt: majority, or Dawid–Skene for the pairs."""
        return self.aggregation in (DatasetBuild.Aggregation.MAJORITY, DatasetBuild.Aggregation.DAWID_SKENE)

    @property
    def dawid_skene(self) -> bool:
        return self.aggregation == DatasetBuild.Aggregation.DAWID_SKENE

    @property
    def keep_ties(self) -> bool:
        return self.ties == DatasetBuild.Ties.KEEP

    @property
    def has_margin(self) -> bool:
        return self.margin != DatasetBuild.Margin.NONE


@dataclass(frozen=True)
class BuildResult:
    counts: dict[str, dict[str, int]]
    summary: dict[str, Any]
    content_hash: str


# --- prompts: normalisation (rendering is training.prompts') ----------------------------


class _PunctuationToSpace(dict[int, str]):
    """A `str.translate` table that maps punctuation to a space, filled in per code point as it is met.

    Building it over every code point up front took longer than normalising a
    build's prompts; other code points map to themselves.
    """

    def __missing__(self, codepoint: int) -> str:
        character = chr(codepoint)
        value = " " if unicodedata.category(character).startswith("P") else character
        self[codepoint] = value
        return value


@functools.cache
def _punctuation_to_space() -> _PunctuationToSpace:
    return _PunctuationToSpace()


def prompt_normalise(*, text: str, messages: list[dict[str, Any]] | None) -> str:
    """Casefold, punctuation to spaces, whitespace collapsed. Chat: the non-system turns.

    System prompts are left out because many chat prompts share one: with it,
    unrelated questions would look alike.
    """
    if messages is not None:
        text = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "system")
    return " ".join(text.casefold().translate(_punctuation_to_space()).split())


@functools.cache
def _minhash_parameters() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(MINHASH_SEED)
    # Multiply-shift hashing: odd 64-bit multipliers, the top 32 bits kept.
    random_63_bits = rng.integers(0, 2**63, size=MINHASH_PERMUTATIONS, dtype=np.uint64)
    multipliers = random_63_bits * np.uint64(2) + np.uint64(1)
    offsets = rng.integers(0, 2**63, size=MINHASH_PERMUTATIONS, dtype=np.uint64)
    return multipliers, offsets


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def minhash_signature(normalised: str) -> np.ndarray:
    """MinHash (uint32 × 128) of the text's word bigrams; a one-word text is one shingle."""
    words = normalised.split()
    shingles = {
        " ".join(words[start : start + SHINGLE_WORDS])
        for start in range(max(1, len(words) - SHINGLE_WORDS + 1))
    }
    hashes = np.fromiter((_hash64(shingle) for shingle in shingles), dtype=np.uint64, count=len(shingles))
    multipliers, offsets = _minhash_parameters()
    permuted = (hashes[:, None] * multipliers[None, :] + offsets[None, :]) >> np.uint64(32)
    return permuted.min(axis=0).astype(np.uint32)


def near_duplicate_roots(signatures: np.ndarray, *, threshold: float) -> np.ndarray:
    """Union-find root of every row: rows whose estimated Jaccard similarity reaches the threshold
    (directly or through others) share a root. Candidates come from LSH banding."""
    count = len(signatures)
    parent = np.arange(count)

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = int(parent[node])
        return node

    for band in range(MINHASH_BANDS):
        block = signatures[:, band * MINHASH_ROWS : (band + 1) * MINHASH_ROWS].astype(np.uint64)
        high = (block[:, 0] << np.uint64(32)) | block[:, 1]
        low = block[:, 2]
        order = np.lexsort((low, high))
        same_as_previous = (high[order][1:] == high[order][:-1]) & (low[order][1:] == low[order][:-1])
        starts = np.flatnonzero(~np.concatenate(([False], same_as_previous)))
        ends = np.append(starts[1:], count)
        for start, end in zip(starts, ends, strict=True):
            if end - start < 2:
                continue
            representatives: list[int] = []
            for member in (int(m) for m in order[start:end]):
                joined = False
                for other in representatives:
                    if find(member) == find(other):
                        joined = True
                        continue
                    similarity = float(np.mean(signatures[member] == signatures[other]))
                    if similarity >= threshold:
                        parent[find(member)] = find(other)
                        joined = True
                if not joined:
                    representatives.append(member)
    return np.array([find(node) for node in range(count)], dtype=np.int64)


@dataclass(frozen=True)
class PromptSplit:
    test_prompt_ids: frozenset[int]
    prompts: int
    groups: int
    merged_groups: int  # groups of two or more prompts
    prompts_in_merged_groups: int
    # sft_in_preferences off: training prompts whose rows are SFT rows only (the others give no SFT row).
    sft_only_prompt_ids: frozenset[int] | None = None

    def split_of(self, prompt_id: int) -> str:
        return "test" if prompt_id in self.test_prompt_ids else "train"

    def keeps(self, output: str, prompt_id: int) -> bool:
        """Whether `output` takes the prompt's rows: always, unless SFT and preference prompts are kept apart."""
        if self.sft_only_prompt_ids is None or prompt_id in self.test_prompt_ids:
            return True
        return (output == "sft") == (prompt_id in self.sft_only_prompt_ids)


# Mixed into a group's key to draw its SFT-or-preference side independently of its test draw.
SFT_SIDE_SALT = 0x5F7_51DE


def _fraction_of(seed: int, key: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prompt_split(*, build: DatasetBuild, options: BuildOptions) -> PromptSplit:
    """Assign every prompt of the build's projects to train or test (numbered steps above)."""
    prompts = Prompt.objects.filter(project__in=build.projects.values("pk")).order_by("pk")
    ids: list[int] = []
    text_hashes: list[int] = []
    # Signatures are stacked a chunk at a time: 512 bytes a prompt, not a Python object each.
    blocks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    for prompt_id, text, messages in prompts.values_list("pk", "text", "messages").iterator(CHUNK_SIZE):
        normalised = prompt_normalise(text=text, messages=messages)
        ids.append(prompt_id)
        text_hashes.append(_hash64(normalised))
        pending.append(minhash_signature(normalised))
        if len(pending) == CHUNK_SIZE:
            blocks.append(np.stack(pending))
            pending.clear()
    if pending:
        blocks.append(np.stack(pending))
    if not ids:
        return PromptSplit(frozenset(), 0, 0, 0, 0)
    signatures = np.concatenate(blocks)
    blocks.clear()
    roots = near_duplicate_roots(signatures, threshold=options.near_duplicate_threshold)
    keys: dict[int, int] = {}
    sizes: Counter[int] = Counter()
    for root, text_hash in zip(roots.tolist(), text_hashes, strict=True):
        keys[root] = min(keys.get(root, text_hash), text_hash)
        sizes[root] += 1
    test_roots = {
        root for root, key in keys.items() if _fraction_of(options.seed, key) < options.test_fraction
    }
    test_ids = frozenset(
        prompt_id for prompt_id, root in zip(ids, roots.tolist(), strict=True) if root in test_roots
    )
    merged = [size for size in sizes.values() if size > 1]
    sft_only = None
    if not options.sft_in_preferences:
        # Half the training groups, by the same kind of key as the test split: near duplicates stay together.
        sft_roots = {
            root for root, key in keys.items() if _fraction_of(options.seed, key ^ SFT_SIDE_SALT) < 0.5
        }
        sft_only = frozenset(
            prompt_id
            for prompt_id, root in zip(ids, roots.tolist(), strict=True)
            if root in sft_roots and prompt_id not in test_ids
        )
    return PromptSplit(test_ids, len(ids), len(keys), len(merged), sum(merged), sft_only)


# --- writing ---------------------------------------------------------------------

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def output_schemas(options: BuildOptions) -> dict[str, pa.Schema]:
    text = pa.list_(_MESSAGE) if options.conversational else pa.string()
    margin = [("margin", pa.float64())] if options.has_margin else []
    likert = [("likert", pa.list_(pa.int64()))] if options.margin == DatasetBuild.Margin.LIKERT_GAP else []
    pairs = [("prompt", text), ("chosen", text), ("rejected", text), *margin]
    return {
        "pairs": pa.schema(pairs),
        "pairs_with_ties": pa.schema([*pairs, ("tie", pa.bool_())]),
        "grouped": pa.schema(
            [("prompt", text), ("completions", pa.list_(text)), ("ranks", pa.list_(pa.int64())), *likert]
        ),
        "sft": pa.schema([("prompt", text), ("completion", text)]),
        "reference": pa.schema([("prompt", text), ("chosen", text), ("rejected", text)]),
    }


# Columns whose values repeat row after row (a prompt in each of its rows, a completion in each of
# its pairs): a batch converts each distinct value once and gathers the column with `take`.
_SHARED_COLUMNS = frozenset({"prompt", "chosen", "rejected", "completion"})


def _column_array(column: tuple[Any, ...], *, type_: pa.DataType, shared: bool) -> pa.Array:
    """One batch's column as an Arrow array of `type_`, the same as `pa.array(column, type_)`.

    Shared columns convert each distinct object once and gather the rows with
    `take` (distinct objects, not values: the writers hand the same object
    for a repeated text). A list column without nulls (grouped completions)
    is converted flat and cut by offsets: pyarrow converts nested Python
    lists many times slower than flat ones.
    """
    if shared:
        first = {id(value): value for value in column}
        position = {key: index for index, key in enumerate(first)}
        distinct = pa.array(list(first.values()), type=type_)
        return distinct.take(pa.array([position[id(value)] for value in column], pa.int32()))
    if pa.types.is_list(type_) and not pa.types.is_primitive(type_.value_type) and None not in column:
        offsets = np.zeros(len(column) + 1, dtype=np.int32)
        np.cumsum([len(value) for value in column], out=offsets[1:])
        flat = [item for value in column for item in value]
        return pa.ListArray.from_arrays(
            pa.array(offsets), _column_array(tuple(flat), type_=type_.value_type, shared=True)
        )
    return pa.array(column, type=type_)


class SplitWriter:
    """One output's rows for one split: JSON Lines, Parquet, and optionally an Arrow stream.

    Rows are held a batch (PARQUET_BATCH_ROWS) at a time as value tuples in
    schema order with their JSON lines; each batch is written as one block of
    lines and one Arrow table built column by column.
    """

    def __init__(
        self, *, folder: Path, output: str, split: str, schema: pa.Schema, arrow: Path | None
    ) -> None:
        directory = folder / output
        directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows = 0
        self.prompts = 0
        self._last_prompt: int | None = None
        self._names = schema.names
        self._shared = [name in _SHARED_COLUMNS for name in schema.names]
        self._values: list[tuple[Any, ...]] = []
        self._lines: list[str] = []
        self._jsonl = (directory / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n")
        self._parquet = pq.ParquetWriter(directory / f"{split}.parquet", schema)
        self._arrow_sink = pa.OSFile(str(arrow), "wb") if arrow is not None else None
        self._arrow = pa.ipc.new_stream(self._arrow_sink, schema) if self._arrow_sink is not None else None

    def write(self, row: dict[str, Any], *, prompt_id: int, line: str | None = None) -> None:
        """Add a row; `line`, when given, is its JSON text already (the same as `json.dumps` of the row)."""
        self.add(
            tuple(row.get(name) for name in self._names),
            json.dumps(row, ensure_ascii=False) if line is None else line,
            prompt_id,
        )

    def add(self, values: tuple[Any, ...], line: str, prompt_id: int) -> None:
        """Add a row as its values in schema order and its JSON line (without the newline)."""
        self._values.append(values)
        self._lines.append(line)
        if len(self._lines) >= JSONL_BLOCK_LINES:
            self._write_lines()
        self.rows += 1
        if prompt_id != self._last_prompt:
            self.prompts += 1
            self._last_prompt = prompt_id
        if len(self._values) >= PARQUET_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._values:
            return
        self._write_lines()
        arrays = [
            _column_array(column, type_=field_.type, shared=shared)
            for field_, column, shared in zip(
                self.schema, zip(*self._values, strict=True), self._shared, strict=True
            )
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._parquet.write_table(table)
        if self._arrow is not None:
            self._arrow.write_table(table)
        self._values.clear()

    def _write_lines(self) -> None:
        if self._lines:
            self._lines.append("")  # the last line's newline
            self._jsonl.write("\n".join(self._lines))
            self._lines.clear()

    def close(self) -> None:
        self._flush()
        self._jsonl.close()
        self._parquet.close()
        if self._arrow is not None and self._arrow_sink is not None:
            self._arrow.close()
            self._arrow_sink.close()


class Outputs:
    """Every output's writers, opened when the output gets its first row (both splits at once)."""

    # Written even when empty, so a consumer always finds them.
    ALWAYS = ("pairs", "grouped", "sft")

    def __init__(
        self, *, folder: Path, arrow_folder: Path, options: BuildOptions, split: PromptSplit | None = None
    ) -> None:
        self.folder = folder
        self.split = split
        self.arrow_folder = arrow_folder
        self.schemas = output_schemas(options)
        self.writers: dict[str, dict[str, SplitWriter]] = {}
        for output in (*self.ALWAYS, *(["pairs_with_ties"] if options.keep_ties else [])):
            self._open(output)

    def _open(self, output: str) -> dict[str, SplitWriter]:
        writers = self.writers.get(output)
        if writers is None:
            writers = {
                split: SplitWriter(
                    folder=self.folder,
                    output=output,
                    split=split,
                    schema=self.schemas[output],
                    arrow=self.arrow_folder / f"{split}.arrow" if output == "pairs" else None,
                )
                for split in BUILD_SPLITS
            }
            self.writers[output] = writers
        return writers

    def write(
        self, output: str, split: str, row: dict[str, Any], *, prompt_id: int, line: str | None = None
    ) -> None:
        if self.split is not None and not self.split.keeps(output, prompt_id):
            return
        self._open(output)[split].write(row, prompt_id=prompt_id, line=line)

    def writer(self, output: str, prompt_id: int) -> SplitWriter | None:
        """The writer of an open output that takes the prompt's rows (None when its rows go elsewhere)."""
        if self.split is None:
            raise ValueError("writer() needs the split")
        if not self.split.keeps(output, prompt_id):
            return None
        return self.writers[output][self.split.split_of(prompt_id)]

    def close(self) -> None:
        for writers in self.writers.values():
            for writer in writers.values():
                writer.close()

    def _opened(self) -> list[tuple[str, dict[str, SplitWriter]]]:
        return [(output, self.writers[output]) for output in BUILD_OUTPUTS if output in self.writers]

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per output and split, outputs in BUILD_OUTPUTS order."""
        return {output: {split: w.rows for split, w in writers.items()} for output, writers in self._opened()}

    def prompt_counts(self) -> dict[str, dict[str, int]]:
        return {
            output: {split: w.prompts for split, w in writers.items()} for output, writers in self._opened()
        }


# --- repeated texts --------------------------------------------------------------


@dataclass(frozen=True)
class RepeatedTexts:
    """Later copies of a text within one task (see "A text shown twice in one task")."""

    copies: frozenset[tuple[int, int]]  # (task id, completion id)
    tasks: int

    def is_copy(self, *, task_id: int, completion_id: int) -> bool:
        return (task_id, completion_id) in self.copies


def repeated_texts_find(*, build: DatasetBuild) -> RepeatedTexts:
    """Every judged task of the build's projects, read in task order for copies of a text."""
    items = (
        TaskCompletion.objects.filter(
            task__project__in=build.projects.values("pk"), task__judgment_count__gt=0
        )
        .order_by("task_id", "position")
        .values_list("task_id", "completion_id", "completion__text")
    )
    copies: set[tuple[int, int]] = set()
    tasks: set[int] = set()
    current: int | None = None
    seen: set[str] = set()
    for task_id, completion_id, text in items.iterator(chunk_size=CHUNK_SIZE):
        if task_id != current:
            current, seen = task_id, set()
        key = completion_text_key(text)
        if key in seen:
            copies.add((task_id, completion_id))
            tasks.add(task_id)
        seen.add(key)
    return RepeatedTexts(frozenset(copies), len(tasks))


# --- pairs -----------------------------------------------------------------------


@dataclass(slots=True)
class Vote:
    chosen_id: int
    rejected_id: int
    tie: bool
    margin: float | None


@dataclass
class PairStats:
    comparisons_read: int = 0
    dropped_repeated_text: int = 0
    dropped_flagged: int = 0
    dropped_no_likert: int = 0
    votes: int = 0
    tie_votes: int = 0
    groups: int = 0
    groups_judged_twice: int = 0
    vote_pairs: int = 0
    vote_pairs_agreeing: int = 0
    majority_kept: int = 0
    majority_ties_kept: int = 0
    majority_no_winner: int = 0
    majority_below_threshold: int = 0
    majority_tie_dropped: int = 0
    dawid_skene_no_label: int = 0
    tie_rows_dropped: int = 0
    winning_shares: Counter[str] = field(default_factory=Counter)
    margins: Counter[str] = field(default_factory=Counter)
    # Dawid–Skene: each labeler's estimated reliability (see LabelerReliability).
    labelers: list[dict[str, Any]] = field(default_factory=list)


def _pairs_of(count: int) -> int:
    return count * (count - 1) // 2


class PairWriter:
    """Turns one (prompt, pair) group of votes at a time into rows (rules above).

    `prompt_start` comes before the prompt's groups: each row is then the
    prompt's and its completions' values and JSON, each made once per prompt.
    """

    def __init__(
        self,
        *,
        outputs: Outputs,
        options: BuildOptions,
        split: PromptSplit,
        labels: PairLabels | None = None,
    ) -> None:
        self.outputs = outputs
        self.options = options
        self.split = split
        self.labels = labels
        self.stats = PairStats()
        self._json_numbers: dict[float, tuple[str, str]] = {}  # a margin's JSON and its `_number` text
        self._has_margin = options.has_margin
        self._keep_ties = options.keep_ties
        self._conversational = options.conversational
        self._prompt_id = 0
        self._prompt: Rendered = ""
        self._texts: dict[int, str] = {}
        # Per completion of the prompt: its value in a row and its JSON.
        self._encoded: dict[int, tuple[Any, str]] = {}
        self._line_start = ""
        self._pairs: SplitWriter | None = None
        self._with_ties: SplitWriter | None = None

    def prompt_start(self, *, prompt_id: int, prompt: Rendered, texts: dict[int, str]) -> None:
        """The prompt whose groups come next, with its completions' texts by id."""
        self._prompt_id = prompt_id
        self._prompt = prompt
        self._texts = texts
        self._encoded = {}
        self._line_start = f'{{"prompt": {json.dumps(prompt, ensure_ascii=False)}, "chosen": '
        self._pairs = self.outputs.writer("pairs", prompt_id)
        self._with_ties = (
            self.outputs.writer("pairs_with_ties", prompt_id) if self.options.keep_ties else None
        )

    def _completion(self, completion_id: int) -> tuple[Any, str]:
        encoded = self._encoded.get(completion_id)
        if encoded is None:
            text = self._texts[completion_id]
            rendered = completion_render(text, conversational=self._conversational)
            encoded = self._encoded[completion_id] = (rendered, json.dumps(rendered, ensure_ascii=False))
        return encoded

    def _emit(self, vote: Vote) -> None:
        """The vote's row: its JSON line from its parts' JSON, the same text as json.dumps of the row."""
        chosen, chosen_json = self._completion(vote.chosen_id)
        rejected, rejected_json = self._completion(vote.rejected_id)
        line = f'{self._line_start}{chosen_json}, "rejected": {rejected_json}'
        if self._has_margin:
            margin = float(0.0 if vote.tie or vote.margin is None else vote.margin)
            # Cached by value, but for zero: 0.0 and -0.0 are one key and two texts.
            known = self._json_numbers.get(margin) if margin else None
            if known is None:
                known = (json.dumps(margin), _number(margin))
                if margin:
                    self._json_numbers[margin] = known
            line += f', "margin": {known[0]}'
            values: tuple[Any, ...] = (self._prompt, chosen, rejected, margin)
        else:
            values = (self._prompt, chosen, rejected)
        if not vote.tie:
            if self._pairs is not None:
                self._pairs.add(values, line + "}", self._prompt_id)
            if self._has_margin:
                self.stats.margins[known[1]] += 1
        if self._keep_ties:
            if self._with_ties is not None:
                self._with_ties.add(
                    (*values, vote.tie),
                    line + (', "tie": true}' if vote.tie else ', "tie": false}'),
                    self._prompt_id,
                )
        elif vote.tie:
            self.stats.tie_rows_dropped += 1

    def group(self, *, low: int, high: int, votes: list[Vote]) -> None:
        """One (prompt, pair) group's votes, the pair's completion ids `low` < `high`."""
        stats = self.stats
        stats.groups += 1
        low_wins = sum(1 for v in votes if not v.tie and v.chosen_id == low)
        high_wins = sum(1 for v in votes if not v.tie and v.chosen_id == high)
        ties = len(votes) - low_wins - high_wins
        if len(votes) > 1:
            stats.groups_judged_twice += 1
            stats.vote_pairs += _pairs_of(len(votes))
            stats.vote_pairs_agreeing += _pairs_of(low_wins) + _pairs_of(high_wins) + _pairs_of(ties)
        if not self.options.majority:
            for vote in votes:
                self._emit(vote)
            return
        if self.labels is not None:
            winner = self._labelled(prompt_id=self._prompt_id, low=low, high=high)
        else:
            winner = self._majority(low_wins=low_wins, high_wins=high_wins, ties=ties, total=len(votes))
        if winner is None:
            return
        if winner == "tie":
            winning = [v for v in votes if v.tie]
            vote = Vote(low, high, True, 0.0)
        else:
            chosen, rejected = (low, high) if winner == "low" else (high, low)
            winning = [v for v in votes if not v.tie and v.chosen_id == chosen]
            margins = [v.margin for v in winning if v.margin is not None]
            vote = Vote(chosen, rejected, False, sum(margins) / len(margins) if margins else None)
        stats.winning_shares[_share_bucket(len(winning) / len(votes))] += 1
        self._emit(vote)

    def _labelled(self, *, prompt_id: int, low: int, high: int) -> str | None:
        """The outcome Dawid–Skene gave the pair, when its posterior reaches the agreement threshold."""
        assert self.labels is not None
        stats = self.stats
        found = self.labels.outcomes.get((prompt_id, low, high))
        if found is None:  # only tie votes, with ties dropped
            stats.dawid_skene_no_label += 1
            return None
        outcome, posterior = found
        if posterior < self.options.agreement_threshold:
            stats.majority_below_threshold += 1
            return None
        if outcome == "tie":
            stats.majority_ties_kept += 1
        else:
            stats.majority_kept += 1
        return outcome

    def _majority(self, *, low_wins: int, high_wins: int, ties: int, total: int) -> str | None:
        """The winning outcome ("low", "high" or "tie"), or None when the pair yields no row."""
        stats = self.stats
        outcomes = {"low": low_wins, "high": high_wins}
        if self.options.keep_ties:
            outcomes["tie"] = ties
        best = max(outcomes.values())
        leaders = [name for name, votes in outcomes.items() if votes == best]
        if len(leaders) != 1 or best == 0:
            if not self.options.keep_ties and low_wins == high_wins and ties > 0 and low_wins == 0:
                stats.majority_tie_dropped += 1
            else:
                stats.majority_no_winner += 1
            return None
        if best / total < self.options.agreement_threshold:
            stats.majority_below_threshold += 1
            return None
        if leaders[0] == "tie":
            stats.majority_ties_kept += 1
        else:
            stats.majority_kept += 1
        return leaders[0]


def _share_bucket(share: float) -> str:
    """Shares in tenths: "0.5–0.6", …, "1.0" on its own."""
    if share >= 1.0:
        return "1.0"
    tenth = math.floor(share * 10 + 1e-9) / 10
    return f"{tenth:.1f}–{tenth + 0.1:.1f}"


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value == value else "nan"


def _vote_from(
    row: Any,
    options: BuildOptions,
    stats: PairStats,
    repeated: RepeatedTexts,
    *,
    chosen_uid: str | None = None,
    rejected_uid: str | None = None,
    judgment: Any = None,
) -> Vote | None:
    """The row's vote under the build's filters (None when one drops it).

    Uids come from the row unless given; the judgment's flags, ranks and
    Likert ratings from `judgment` (a row with those fields) when given, else
    from the row's `judgment__…` fields.
    """
    if repeated.copies and (
        repeated.is_copy(task_id=row.task_id, completion_id=row.chosen_id)
        or repeated.is_copy(task_id=row.task_id, completion_id=row.rejected_id)
    ):
        stats.dropped_repeated_text += 1
        return None
    if chosen_uid is None or rejected_uid is None:
        chosen_uid, rejected_uid = str(row.chosen__uid), str(row.rejected__uid)
    if options.exclude_flagged:
        flags = (row.judgment__flags if judgment is None else judgment.flags) or {}
        if flags.get(chosen_uid) or flags.get(rejected_uid):
            stats.dropped_flagged += 1
            return None
    margin: float | None = None
    if options.margin == DatasetBuild.Margin.RANK_GAP:
        ranks = (row.judgment__ranks if judgment is None else judgment.ranks) or {}
        margin = float(ranks[rejected_uid] - ranks[chosen_uid])
    elif options.margin == DatasetBuild.Margin.LIKERT_GAP:
        likert = (row.judgment__likert if judgment is None else judgment.likert) or {}
        if chosen_uid not in likert or rejected_uid not in likert:
            stats.dropped_no_likert += 1
            return None
        margin = float(likert[chosen_uid] - likert[rejected_uid])
    return Vote(row.chosen_id, row.rejected_id, row.is_tie, 0.0 if row.is_tie else margin)


# Dawid–Skene stops when the log-likelihood moves less than this, or after the iterations.
DAWID_SKENE_ITERATIONS = 100
DAWID_SKENE_TOLERANCE = 1e-7


@dataclass(frozen=True)
class PairLabels:
    """What Dawid–Skene made of the votes: each pair's outcome and posterior, and each labeler's reliability."""

    # (prompt id, lower completion id, higher completion id) -> ("low" | "high" | "tie", posterior)
    outcomes: dict[tuple[int, int, int], tuple[str, float]]
    # One row per labeler: user id, username, votes, estimated reliability.
    labelers: list[dict[str, Any]]


def pair_labels_dawid_skene(
    *, comparisons: Any, options: BuildOptions, repeated: RepeatedTexts
) -> PairLabels:
    """Aggregate every pair's votes with Dawid–Skene (crowd-kit), weighing labelers by estimated reliability.

    1. One streamed pass over the same comparisons the rows come from, with
       the same filters (_vote_from): each vote becomes (pair, labeler,
       outcome), the outcome being which of the pair won ("low"/"high", by
       completion id) or, with ties kept, "tie". With ties dropped, tie votes
       are left out here (they favour neither side).
    2. crowd-kit's DawidSkene fits one confusion matrix per labeler and the
       outcomes' prior by EM, starting from the majority vote; each pair gets
       its most probable outcome and that outcome's posterior.
    3. A labeler's reliability is the chance they name the true outcome:
       the sum over outcomes of prior × P(they say it | it is true).
    Memory holds one small tuple per vote (three integer codes), unlike the
    streaming majority, because EM needs every vote at once.
    """
    import pandas as pd
    from crowdkit.aggregation import DawidSkene
    from django.contrib.auth import get_user_model

    pair_codes: dict[tuple[int, int, int], int] = {}
    pair_column: list[int] = []
    labeler_column: list[int] = []
    outcome_column: list[str] = []
    scratch = PairStats()
    for row in _rows_fast(comparisons):
        vote = _vote_from(row, options, scratch, repeated)
        if vote is None or (vote.tie and not options.keep_ties):
            continue
        key = (row.prompt_id, row.pair_low, row.pair_high)
        pair_column.append(pair_codes.setdefault(key, len(pair_codes)))
        labeler_column.append(row.labeler_id)
        outcome_column.append("tie" if vote.tie else ("low" if vote.chosen_id == row.pair_low else "high"))
    if not pair_column:
        return PairLabels(outcomes={}, labelers=[])
    frame = pd.DataFrame({"task": pair_column, "worker": labeler_column, "label": outcome_column})
    model = DawidSkene(n_iter=DAWID_SKENE_ITERATIONS, tol=DAWID_SKENE_TOLERANCE)
    with warnings.catch_warnings():
        # crowd-kit 1.4.2 still passes pandas keywords that pandas 3 deprecates; the results are the same.
        warnings.simplefilter("ignore", DeprecationWarning)
        winners = model.fit_predict(frame)
    posteriors = model.probas_
    keys = {code: key for key, code in pair_codes.items()}
    outcomes = {
        keys[int(code)]: (str(label), float(posteriors.at[code, label])) for code, label in winners.items()
    }
    priors = model.priors_
    errors = model.errors_
    votes = frame.groupby("worker").size()
    names = dict(get_user_model().objects.filter(pk__in=list(votes.index)).values_list("pk", "username"))
    labelers = []
    for worker in sorted(votes.index):
        reliability = 0.0
        for outcome, prior in priors.items():
            if (worker, outcome) in errors.index:
                reliability += float(prior) * float(errors.at[(worker, outcome), outcome])
        labelers.append(
            {
                "user_id": int(worker),
                "username": names.get(int(worker), str(worker)),
                "votes": int(votes[worker]),
                "reliability": round(reliability, 4),
            }
        )
    return PairLabels(outcomes=outcomes, labelers=labelers)


# --- judgments: grouped, SFT and reference rows ---------------------------------


@dataclass
class JudgmentStats:
    judgments_read: int = 0
    repeated_text_items: int = 0
    grouped_dropped: int = 0
    sft_tied_top: int = 0
    sft_flagged_top: int = 0
    sft_majority_kept: int = 0
    sft_majority_dropped: int = 0
    reference_prompts: int = 0


@dataclass
class PromptJudgments:
    """What one prompt's judgments leave for the rows written when the prompt is done."""

    prompt_id: int
    prompt: Rendered
    reference: str | None
    top_votes: Counter[int] = field(default_factory=Counter)
    top_voters: int = 0
    completions: dict[int, str] = field(default_factory=dict)


class JudgmentWriter:
    def __init__(
        self, *, outputs: Outputs, options: BuildOptions, split: PromptSplit, repeated: RepeatedTexts
    ) -> None:
        self.outputs = outputs
        self.options = options
        self.split = split
        self.repeated = repeated
        self.stats = JudgmentStats()
        self._copies = repeated.copies
        self._likert = options.margin == DatasetBuild.Margin.LIKERT_GAP
        # The texts of the current prompt's SFT rows, so that its reference answer is not written twice.
        self._sft_prompt_id: int | None = None
        self._sft_texts: list[str] = []
        # The current prompt's JSON, and each of its completions' texts as a row holds it and as JSON.
        self._encoded_prompt_id: int | None = None
        self._prompt_json = ""
        self._encoded: dict[str, tuple[Any, str]] = {}

    def _encode(self, current: PromptJudgments, text: str) -> tuple[Any, str]:
        """A completion's text as rows hold it and its JSON (the same as json.dumps of it), made once per prompt."""
        if current.prompt_id != self._encoded_prompt_id:
            self._encoded_prompt_id = current.prompt_id
            self._prompt_json = json.dumps(current.prompt, ensure_ascii=False)
            self._encoded = {}
        encoded = self._encoded.get(text)
        if encoded is None:
            rendered = completion_render(text, conversational=self.options.conversational)
            encoded = self._encoded[text] = (rendered, json.dumps(rendered, ensure_ascii=False))
        return encoded

    def judgment(self, current: PromptJudgments, judgment: Any, items: list[tuple[int, str, str]]) -> None:
        stats = self.stats
        stats.judgments_read += 1
        if self._copies:
            shown = len(items)
            task_id = judgment.task_id
            items = [item for item in items if (task_id, item[0]) not in self._copies]
            stats.repeated_text_items += shown - len(items)
        ranks_by_uid = judgment.ranks or {}
        if not items or any(uid not in ranks_by_uid for _id, uid, _text in items):
            stats.grouped_dropped += 1
            return
        flagged: set[str] = set()
        if self.options.exclude_flagged:
            flagged = {uid for uid, names in (judgment.flags or {}).items() if names}
        completions = current.completions
        for completion_id, _uid, text in items:
            completions.setdefault(completion_id, text)

        item_ranks = [int(ranks_by_uid[uid]) for _cid, uid, _text in items]
        if flagged:
            kept = [item for item in items if item[1] not in flagged]
            ranks = [int(ranks_by_uid[uid]) for _cid, uid, _text in kept]
        else:
            kept, ranks = items, item_ranks
        if len(kept) >= 2 and len(set(ranks)) > 1:
            writer = self.outputs.writer("grouped", current.prompt_id)
            if writer is not None:
                encoded = [self._encode(current, text) for *_, text in kept]
                line = (
                    f'{{"prompt": {self._prompt_json}, "completions": [{", ".join(e[1] for e in encoded)}], '
                    f'"ranks": [{", ".join(map(str, ranks))}]'
                )
                values: tuple[Any, ...] = (current.prompt, [e[0] for e in encoded], ranks)
                if self._likert:
                    likert_by_uid = judgment.likert or {}
                    likert = (
                        [int(likert_by_uid[uid]) for _cid, uid, _text in kept]
                        if all(uid in likert_by_uid for _c, uid, _t in kept)
                        else None
                    )
                    likert_json = "null" if likert is None else "[" + ", ".join(map(str, likert)) + "]"
                    line += f', "likert": {likert_json}'
                    values += (likert,)
                writer.add(values, line + "}", current.prompt_id)
        else:
            stats.grouped_dropped += 1

        best = min(item_ranks)
        if item_ranks.count(best) > 1:
            stats.sft_tied_top += 1
            current.top_voters += 1  # a vote for none
            return
        top_id, top_uid, top_text = items[item_ranks.index(best)]
        if top_uid in flagged:
            stats.sft_flagged_top += 1
            return
        if self.options.majority:
            current.top_voters += 1
            current.top_votes[top_id] += 1
        else:
            self._sft(current, top_text)

    def _sft(self, current: PromptJudgments, text: str) -> None:
        if self._sft_prompt_id != current.prompt_id:
            self._sft_prompt_id, self._sft_texts = current.prompt_id, []
        self._sft_texts.append(text)
        writer = self.outputs.writer("sft", current.prompt_id)
        if writer is not None:
            rendered, completion_json = self._encode(current, text)
            writer.add(
                (current.prompt, rendered),
                f'{{"prompt": {self._prompt_json}, "completion": {completion_json}}}',
                current.prompt_id,
            )

    def prompt_done(self, current: PromptJudgments) -> None:
        if self.options.majority and current.top_voters:
            # Every judgment may have tied at the top: then nobody voted for a completion.
            ranked = current.top_votes.most_common(2) or [(0, 0)]
            leader, votes = ranked[0]
            unique = len(ranked) == 1 or ranked[1][1] < votes
            if votes and unique and votes / current.top_voters >= self.options.agreement_threshold:
                self.stats.sft_majority_kept += 1
                self._sft(current, current.completions[leader])
            else:
                self.stats.sft_majority_dropped += 1
        reference = current.reference
        if isinstance(reference, str) and reference.strip():
            self.stats.reference_prompts += 1
            chosen = completion_render(reference, conversational=self.options.conversational)
            split = self.split.split_of(current.prompt_id)
            # A reference answer is a demonstration as much as a preference: SFT learns from it too
            # (once: not again when people ranked the same text top).
            written = self._sft_texts if self._sft_prompt_id == current.prompt_id else []
            if completion_text_key(reference) not in {completion_text_key(text) for text in written}:
                self._sft(current, reference)
            # The reference faces each text once, never itself (the same text by completion_text_key).
            texts = {completion_text_key(reference)}
            for _completion_id, text in sorted(current.completions.items()):
                if completion_text_key(text) in texts:
                    continue
                texts.add(completion_text_key(text))
                row = {
                    "prompt": current.prompt,
                    "chosen": chosen,
                    "rejected": completion_render(text, conversational=self.options.conversational),
                }
                self.outputs.write("reference", split, row, prompt_id=current.prompt_id)


# --- the one pass over prompts: pair rows, then grouped, SFT and reference rows ----------


@dataclass
class PromptTexts:
    """One prompt's texts as the rows need them."""

    text: str
    messages: Any
    reference: Any
    completions: dict[int, str]  # completion id -> text
    uids: dict[int, str]  # completion id -> uid
    items: dict[int, list[tuple[int, str, str]]]  # task id -> (completion id, uid, text) in task order


class PromptTextsReader:
    """The texts of prompts asked for in increasing id order, from three streams in prompt order.

    The prompts, their completions and their tasks' items are walked beside
    the comparisons and judgments (a merge join): each text crosses the wire
    once, not once per row that shows it, and the rows' own queries stay
    narrow. The streams cover every prompt of the build's projects that has
    a judgment, a superset of the prompts the rows name.
    """

    def __init__(self, *, build: DatasetBuild) -> None:
        judged = Judgment.objects.filter(task__project__in=build.projects.values("pk")).values(
            "task__prompt_id"
        )
        self._prompts = _rows_fast(
            Prompt.objects.filter(pk__in=judged)
            .order_by("pk")
            .values_list("pk", "text", "messages", "metadata__reference")
        )
        self._completions = _rows_fast(
            Completion.objects.filter(prompt_id__in=judged)
            .order_by("prompt_id", "pk")
            .values_list("prompt_id", "pk", "text", "uid")
        )
        self._items = _rows_fast(
            TaskCompletion.objects.filter(task__prompt_id__in=judged)
            .order_by("task__prompt_id", "task_id", "position")
            .values_list("task__prompt_id", "task_id", "completion_id")
        )
        self._completion = next(self._completions, None)
        self._item = next(self._items, None)

    def close(self) -> None:
        """Close the three streams (and their server-side cursors), read to the end or not."""
        for stream in (self._prompts, self._completions, self._items):
            stream.close()

    def get(self, prompt_id: int) -> PromptTexts:
        for row in self._prompts:
            if row[0] == prompt_id:
                _pk, text, messages, reference = row
                break
        else:
            raise LookupError(f"prompt {prompt_id} is not among the judged prompts of the build's projects")
        completions: dict[int, str] = {}
        uids: dict[int, str] = {}
        while self._completion is not None and self._completion[0] <= prompt_id:
            if self._completion[0] == prompt_id:
                completions[self._completion[1]] = self._completion[2]
                uids[self._completion[1]] = str(self._completion[3])
            self._completion = next(self._completions, None)
        shown: list[tuple[int, int]] = []
        while self._item is not None and self._item[0] <= prompt_id:
            if self._item[0] == prompt_id:
                shown.append((self._item[1], self._item[2]))
            self._item = next(self._items, None)
        # A task shows its prompt's completions; one that shows another's is read on its own.
        others = {completion_id for _task_id, completion_id in shown if completion_id not in completions}
        if others:
            for pk, text_of, uid in Completion.objects.filter(pk__in=others).values_list("pk", "text", "uid"):
                completions[pk] = text_of
                uids[pk] = str(uid)
        items: dict[int, list[tuple[int, str, str]]] = {}
        for task_id, completion_id in shown:
            items.setdefault(task_id, []).append(
                (completion_id, uids[completion_id], completions[completion_id])
            )
        return PromptTexts(text, messages, reference, completions, uids, items)


def _judgment_read(judgment_id: int) -> Any:
    """A comparison's judgment that the judgments' stream did not give (the selections differ for it)."""
    (row,) = _rows_fast(
        Judgment.objects.filter(pk=judgment_id).values_list("id", "ranks", "likert", "flags", named=True),
        small=True,
    )
    return row


def rows_write(
    *,
    build: DatasetBuild,
    options: BuildOptions,
    split: PromptSplit,
    outputs: Outputs,
    excluded: dict[int, list[int]],
    judgment_id_max: int,
    repeated: RepeatedTexts,
    tick: Callable[[], None],
) -> tuple[PairStats, JudgmentStats]:
    """Every row of the build in one pass over the prompts that have some (rules above).

    1. Comparisons stream ordered by (prompt, unordered pair, id) and
       judgments by (prompt, id); the prompts' texts come beside them
       (PromptTextsReader).
    2. For each prompt in id order: its judgments are read; its comparisons,
       group by group, become pair rows (PairWriter), each vote reading its
       judgment's ranks, ratings and flags from them; then the judgments
       become grouped, SFT and reference rows (JudgmentWriter). Each output's
       rows come in the same order as if each were written on its own.
    `tick` is called once per judgment.
    """
    selection = {"build": build, "excluded": excluded, "judgment_id_max": judgment_id_max}
    fields = ["id", "prompt_id", "task_id", "chosen_id", "rejected_id", "is_tie", "labeler_id"]
    # The texts and uids come from a stream of the prompts' completions, and the judgments' ranks,
    # Likert ratings and flags from the judgments' own stream, not joined into every row: a
    # completion is in a dozen comparisons and a judgment in six, and narrow rows sort and travel
    # far faster. (Dawid–Skene's own pass reads them joined.)
    joined = []
    if options.exclude_flagged:
        joined.append("judgment__flags")
    if options.margin == DatasetBuild.Margin.RANK_GAP:
        joined.append("judgment__ranks")
    if options.margin == DatasetBuild.Margin.LIKERT_GAP:
        joined.append("judgment__likert")
    ordered = (
        _comparisons_read(**selection)
        .annotate(pair_low=Least("chosen_id", "rejected_id"), pair_high=Greatest("chosen_id", "rejected_id"))
        .order_by("prompt_id", "pair_low", "pair_high", "id")
    )
    labels = (
        pair_labels_dawid_skene(
            comparisons=ordered.values_list(
                *fields, *joined, "chosen__uid", "rejected__uid", "pair_low", "pair_high", named=True
            ),
            options=options,
            repeated=repeated,
        )
        if options.dawid_skene
        else None
    )
    pairs = PairWriter(outputs=outputs, options=options, split=split, labels=labels)
    pairs.stats.labelers = labels.labelers if labels is not None else []
    pair_stats = pairs.stats
    judgments = JudgmentWriter(outputs=outputs, options=options, split=split, repeated=repeated)
    comparison_rows = _rows_fast(
        ordered.values_list(*fields, "judgment_id", "pair_low", "pair_high", named=True)
    )
    judgment_rows = _rows_fast(
        _judgments_read(**selection)
        .order_by("task__prompt_id", "id")
        .values_list("id", "task_id", "task__prompt_id", "ranks", "likert", "flags", named=True)
    )
    texts = PromptTextsReader(build=build)
    # Server-side cursors are closed here, when the pass ends however it ends: a stream left to the
    # garbage collector would close its cursor in the middle of a later query on the same connection.
    try:
        comparison = next(comparison_rows, None)
        judgment = next(judgment_rows, None)
        while comparison is not None or judgment is not None:
            if judgment is None or (
                comparison is not None and comparison.prompt_id <= judgment.task__prompt_id
            ):
                prompt_id = comparison.prompt_id
            else:
                prompt_id = judgment.task__prompt_id
            prompt_texts = texts.get(prompt_id)
            prompt = prompt_render(
                text=prompt_texts.text, messages=prompt_texts.messages, conversational=options.conversational
            )
            # The prompt's judgments first: its comparisons read their judgment's ranks, ratings and flags.
            prompt_judgments = []
            while judgment is not None and judgment.task__prompt_id == prompt_id:
                prompt_judgments.append(judgment)
                judgment = next(judgment_rows, None)
            judgments_by_id = {row.id: row for row in prompt_judgments}
            if comparison is not None and comparison.prompt_id == prompt_id:
                pairs.prompt_start(prompt_id=prompt_id, prompt=prompt, texts=prompt_texts.completions)
                uids = prompt_texts.uids
                low = high = 0
                votes: list[Vote] = []
                while comparison is not None and comparison.prompt_id == prompt_id:
                    pair_stats.comparisons_read += 1
                    if comparison.pair_low != low or comparison.pair_high != high:
                        if votes:
                            pairs.group(low=low, high=high, votes=votes)
                        low, high, votes = comparison.pair_low, comparison.pair_high, []
                    vote = _vote_from(
                        comparison,
                        options,
                        pair_stats,
                        repeated,
                        chosen_uid=uids[comparison.chosen_id],
                        rejected_uid=uids[comparison.rejected_id],
                        judgment=judgments_by_id.get(comparison.judgment_id)
                        or _judgment_read(comparison.judgment_id),
                    )
                    if vote is not None:
                        pair_stats.votes += 1
                        pair_stats.tie_votes += vote.tie
                        votes.append(vote)
                    comparison = next(comparison_rows, None)
                if votes:
                    pairs.group(low=low, high=high, votes=votes)
            if prompt_judgments:
                current = PromptJudgments(
                    prompt_id=prompt_id, prompt=prompt, reference=prompt_texts.reference
                )
                for row in prompt_judgments:
                    tick()
                    judgments.judgment(current, row, prompt_texts.items.get(row.task_id, []))
                judgments.prompt_done(current)
    finally:
        comparison_rows.close()
        judgment_rows.close()
        texts.close()
    return pair_stats, judgments.stats


# --- hf/, the card, the hash -------------------------------------------------------


def hf_save(*, folder: Path, arrow_folder: Path) -> None:
    """The pairs as a DatasetDict (train/test) with save_to_disk, read from the Arrow streams."""
    import datasets
    from datasets.table import MemoryMappedTable

    datasets.disable_progress_bars()
    splits = {}
    for split in BUILD_SPLITS:
        table = MemoryMappedTable.from_file(str(arrow_folder / f"{split}.arrow"))
        # A fingerprint from the content, not a random one, so hf/ is reproducible too.
        fingerprint = _file_sha256(folder / "pairs" / f"{split}.jsonl")[:16]
        splits[split] = datasets.Dataset(table, fingerprint=fingerprint, split=datasets.NamedSplit(split))
    # One shard at least: an empty split saved with none cannot be loaded back.
    shards = {name: max(1, math.ceil(dataset.data.nbytes / 500_000_000)) for name, dataset in splits.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder / "hf"), num_shards=shards)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(folder: Path) -> str:
    """sha256 over the JSONL files (sorted by relative path) and then the card."""
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.glob("*/*.jsonl"))
    digest = hashlib.sha256()
    for relative in [*paths, CARD_FILENAME]:
        path = folder / relative
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def build_summary(
    *,
    build: DatasetBuild,
    options: BuildOptions,
    split: PromptSplit,
    pair_stats: PairStats,
    judgment_stats: JudgmentStats,
    repeated: RepeatedTexts,
    excluded: dict[int, list[int]],
    judgment_id_max: int,
    outputs: Outputs,
    versions: JudgmentVersions,
    judges: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the card reports, as JSON-ready values (no timestamps, no build id)."""
    projects = [
        {"id": project.pk, "name": project.name, "kind": project.kind}
        for project in build.projects.order_by("pk")
    ]
    return {
        "projects": projects,
        "filters": {
            "date_from": build.date_from.isoformat() if build.date_from else None,
            "date_to": build.date_to.isoformat() if build.date_to else None,
            "labeler_ids": sorted(build.labelers.values_list("pk", flat=True)),
            "min_gold_accuracy": build.min_gold_accuracy,
            "left_out_for_gold_accuracy": {str(k): v for k, v in sorted(excluded.items())},
            "exclude_flagged": options.exclude_flagged,
            "judgments_up_to_id": judgment_id_max,
        },
        "model_judges": {
            "sources": build.sources,
            "judge_agreement_min": build.judge_agreement_min,
            "judges": judges or [],
        },
        "judgment_versions": {
            "judgments": versions.judgments,
            "revised": versions.revised,
            "sha256": versions.sha256,
        },
        "options": {
            "aggregation": options.aggregation,
            "agreement_threshold": options.agreement_threshold,
            "ties": options.ties,
            "margin": options.margin,
            "format": options.format,
            "test_fraction": options.test_fraction,
            "seed": options.seed,
            "near_duplicate_threshold": options.near_duplicate_threshold,
            "sft_in_preferences": options.sft_in_preferences,
            "shingle_words": SHINGLE_WORDS,
            "minhash_permutations": MINHASH_PERMUTATIONS,
            "minhash_bands": MINHASH_BANDS,
        },
        "split": {
            "prompts": split.prompts,
            "prompt_groups": split.groups,
            "near_duplicate_groups": split.merged_groups,
            "prompts_in_near_duplicate_groups": split.prompts_in_merged_groups,
            "test_prompts": len(split.test_prompt_ids),
        },
        "prompts_with_rows": outputs.prompt_counts(),
        "repeated_texts": {
            "tasks": repeated.tasks,
            "comparisons_left_out": pair_stats.dropped_repeated_text,
            "judged_completions_left_out": judgment_stats.repeated_text_items,
        },
        "comparisons": {
            "read": pair_stats.comparisons_read,
            "dropped_flagged": pair_stats.dropped_flagged,
            "dropped_without_likert": pair_stats.dropped_no_likert,
            "votes": pair_stats.votes,
            "tie_votes": pair_stats.tie_votes,
            "tie_rate": _rate(pair_stats.tie_votes, pair_stats.votes),
            "tie_rows_dropped": pair_stats.tie_rows_dropped,
        },
        "agreement": {
            "pairs": pair_stats.groups,
            "pairs_judged_more_than_once": pair_stats.groups_judged_twice,
            "vote_pairs": pair_stats.vote_pairs,
            "vote_pairs_agreeing": pair_stats.vote_pairs_agreeing,
            "rate": _rate(pair_stats.vote_pairs_agreeing, pair_stats.vote_pairs),
        },
        "majority": (
            {
                "preference_rows": pair_stats.majority_kept,
                "tie_rows": pair_stats.majority_ties_kept,
                "dropped_no_unique_winner": pair_stats.majority_no_winner,
                "dropped_below_threshold": pair_stats.majority_below_threshold,
                "dropped_tied": pair_stats.majority_tie_dropped,
                "winning_share": dict(sorted(pair_stats.winning_shares.items())),
                "sft_kept": judgment_stats.sft_majority_kept,
                "sft_dropped": judgment_stats.sft_majority_dropped,
            }
            if options.majority
            else None
        ),
        "dawid_skene": (
            {"dropped_no_label": pair_stats.dawid_skene_no_label, "labelers": pair_stats.labelers}
            if options.dawid_skene
            else None
        ),
        "margins": dict(sorted(pair_stats.margins.items(), key=lambda item: float(item[0]))),
        "judgments": {
            "read": judgment_stats.judgments_read,
            "grouped_dropped": judgment_stats.grouped_dropped,
            "sft_tied_top": judgment_stats.sft_tied_top,
            "sft_flagged_top": judgment_stats.sft_flagged_top,
            "prompts_with_reference": judgment_stats.reference_prompts,
        },
    }


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return _number(value)
    return str(value)


@dataclass(frozen=True)
class JudgmentVersions:
    """Which version of each judgment a build read: labelers may revise a judgment until it is reviewed."""

    judgments: int
    revised: int
    sha256: str  # over "id:version" lines in id order


def judgment_versions_read(
    *, build: DatasetBuild, excluded: dict[int, list[int]], judgment_id_max: int
) -> JudgmentVersions:
    """The versions of the judgments the build selects, read when the build starts."""
    digest = hashlib.sha256()
    judgments = revised = 0
    rows = (
        _judgments_read(build=build, excluded=excluded, judgment_id_max=judgment_id_max)
        .order_by("id")
        .values_list("id", "version")
    )
    for judgment_id, version in rows.iterator(chunk_size=CHUNK_SIZE):
        digest.update(f"{judgment_id}:{version}\n".encode())
        judgments += 1
        revised += version > 1
    return JudgmentVersions(judgments=judgments, revised=revised, sha256=digest.hexdigest())


def card_render(*, summary: dict[str, Any], counts: dict[str, dict[str, int]]) -> str:
    """The dataset card (README.md): front matter for the Hub's loaders, then the report."""
    lines = ["---", "configs:"]
    for index, output in enumerate(counts):
        lines.append(f"- config_name: {output}")
        if index == 0:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split in BUILD_SPLITS:
            lines += [f"  - split: {split}", f"    path: {output}/{split}.jsonl"]
    lines += ["tags:", "- preference", "- rlhf", "- rankwise", "---", ""]

    lines += ["# Preference dataset", ""]
    lines += [
        "Human rankings of K completions per prompt, exported by Rankwise: every ranking is",
        "split into its C(K, 2) pairwise comparisons, filtered and aggregated as below.",
        "",
        "## Source",
        "",
    ]
    lines += _table(("project", "id", "kind"), [(p["name"], p["id"], p["kind"]) for p in summary["projects"]])
    filters = summary["filters"]
    lines += [""]
    lines += _table(
        ("filter", "value"),
        [
            ("comparisons from (day, inclusive)", _shown(filters["date_from"])),
            ("comparisons to (day, inclusive)", _shown(filters["date_to"])),
            ("labelers (user ids)", ", ".join(map(str, filters["labeler_ids"])) or "everyone"),
            ("minimum gold accuracy", _shown(filters["min_gold_accuracy"])),
            (
                "left out for gold accuracy (project: user ids)",
                "; ".join(
                    f"{k}: {', '.join(map(str, v))}" for k, v in filters["left_out_for_gold_accuracy"].items()
                )
                or "nobody",
            ),
            ("pairs with a flagged completion", "dropped" if filters["exclude_flagged"] else "kept"),
            ("judgments up to id", filters["judgments_up_to_id"]),
        ],
    )
    model_judges = summary.get("model_judges")
    if model_judges and model_judges["judges"]:
        lines += [
            "",
            "## Model judges",
            "",
            f"Judgments from: {model_judges['sources']} (minimum agreement with the humans' majority "
            f"for calibrated judges: {model_judges['judge_agreement_min']}). Agreement is measured on the "
            "pairs a judge and at least one person both judged.",
            "",
        ]
        lines += _table(
            ("judge", "project", "pairs shared with humans", "agreement with humans", "votes in this build"),
            [
                (
                    judge["username"],
                    judge["project_id"],
                    judge["pairs_shared_with_humans"],
                    _shown(judge["agreement_with_humans"]),
                    "kept" if judge["kept"] else "left out",
                )
                for judge in model_judges["judges"]
            ],
        )
    versions = summary["judgment_versions"]
    lines += [
        "",
        "## Judgment versions",
        "",
        f"{versions['judgments']} judgments, {versions['revised']} of them revised by their labeler "
        "before this build (rejected ones are left out). SHA-256 of their (id, version) pairs, "
        f"in id order: `{versions['sha256']}`.",
    ]
    lines += ["", "## Options", ""]
    lines += _table(("option", "value"), [(k, _shown(v)) for k, v in summary["options"].items()])

    lines += ["", "## Files", ""]
    prompts = summary["prompts_with_rows"]
    rows = []
    for output, splits in counts.items():
        for split in BUILD_SPLITS:
            rows.append((f"{output}/{split}.jsonl (.parquet)", splits[split], prompts[output][split]))
    lines += _table(("file", "rows", "prompts"), rows)
    lines += [
        "",
        "`hf/` holds the `pairs` splits as a `datasets.DatasetDict` (`load_from_disk`).",
        "The TRL files (`pairs/` and `hf/`) never contain ties, whatever the tie option:",
        "TRL's trainers have no tie label. With ties kept, `pairs_with_ties/` has every",
        "pair row plus the ties, marked by `tie`. Grouped rows keep equal ranks.",
        "",
        "## Split",
        "",
    ]
    split = summary["split"]
    lines += _table(
        ("measure", "value"),
        [
            ("prompts in the projects", split["prompts"]),
            ("prompt groups", split["prompt_groups"]),
            ("groups of near-duplicates (2+ prompts)", split["near_duplicate_groups"]),
            ("prompts in those groups", split["prompts_in_near_duplicate_groups"]),
            ("prompts assigned to test", split["test_prompts"]),
        ],
    )
    lines += [
        "",
        "No prompt, and no near-duplicate of one, is on both sides: near-duplicates",
        "(normalised text, MinHash of word bigrams at the threshold above) are one group,",
        "and whole groups go to one side.",
        "",
        "## Statistics",
        "",
    ]
    comparisons = summary["comparisons"]
    agreement = summary["agreement"]
    lines += _table(
        ("measure", "value"),
        [
            ("comparisons read", comparisons["read"]),
            ("dropped: a repeated text", summary["repeated_texts"]["comparisons_left_out"]),
            ("dropped: flagged completion", comparisons["dropped_flagged"]),
            ("dropped: no Likert ratings", comparisons["dropped_without_likert"]),
            ("votes", comparisons["votes"]),
            ("tie votes", comparisons["tie_votes"]),
            ("tie rate", _shown(comparisons["tie_rate"])),
            ("distinct (prompt, pair)", agreement["pairs"]),
            ("pairs judged more than once", agreement["pairs_judged_more_than_once"]),
            ("agreement (agreeing vote pairs / vote pairs)", _shown(agreement["rate"])),
            ("vote pairs", agreement["vote_pairs"]),
        ],
    )
    majority = summary["majority"]
    if majority is not None:
        lines += ["", "### Majority", ""]
        lines += _table(
            ("measure", "value"),
            [
                ("preference rows", majority["preference_rows"]),
                ("tie rows", majority["tie_rows"]),
                ("dropped: no unique winner", majority["dropped_no_unique_winner"]),
                ("dropped: winner below the threshold", majority["dropped_below_threshold"]),
                ("dropped: only ties", majority["dropped_tied"]),
                ("SFT rows kept / dropped", f"{majority['sft_kept']} / {majority['sft_dropped']}"),
            ],
        )
        lines += ["", "Winning share of the votes:", ""]
        lines += _table(("share", "rows"), list(majority["winning_share"].items()))
    dawid_skene = summary.get("dawid_skene")
    if dawid_skene is not None:
        lines += ["", "### Dawid–Skene: labelers' estimated reliability", ""]
        lines += [
            "Pair rows follow Dawid–Skene (crowd-kit) rather than the plain majority: each",
            "labeler's reliability is estimated from the votes themselves, and a pair keeps",
            "its most probable outcome when that outcome's posterior reaches the agreement",
            "threshold (the majority table above counts those rows; its winning shares are",
            "still shares of the votes). SFT rows use the majority rule.",
            "",
        ]
        lines += _table(
            ("labeler", "user id", "votes", "estimated reliability"),
            [
                (row["username"], row["user_id"], row["votes"], _shown(row["reliability"]))
                for row in dawid_skene["labelers"]
            ],
        )
        lines += [
            "",
            f"Pairs with only tie votes (ties dropped), so no label: {dawid_skene['dropped_no_label']}",
        ]
    if summary["margins"]:
        lines += ["", "### Margin (label) distribution of the pairs", ""]
        lines += _table(("margin", "rows"), list(summary["margins"].items()))
    repeated = summary["repeated_texts"]
    lines += ["", "### One text shown twice in a task", ""]
    lines += _table(
        ("measure", "value"),
        [
            ("tasks showing a text twice or more", repeated["tasks"]),
            ("comparisons left out: a repeated text", repeated["comparisons_left_out"]),
            ("judged completions left out: a repeated text", repeated["judged_completions_left_out"]),
        ],
    )
    lines += [
        "",
        "In such a task the first copy in task order stands for the text; the later",
        "copies give no pair row, not even a tie, and are left out of grouped, SFT and",
        "reference rows. Texts are the same when equal after NFC and trimming the ends.",
    ]
    judgments = summary["judgments"]
    lines += ["", "### Judgments", ""]
    lines += _table(
        ("measure", "value"),
        [
            ("judgments read", judgments["read"]),
            ("grouped rows dropped (under two completions, or all tied)", judgments["grouped_dropped"]),
            ("tie at the top (no SFT vote)", judgments["sft_tied_top"]),
            ("flagged top (no SFT vote)", judgments["sft_flagged_top"]),
            ("prompts with a reference answer", judgments["prompts_with_reference"]),
        ],
    )
    lines += [
        "",
        "## Rules",
        "",
        "- every_vote: each comparison is a row. majority: one row per (prompt, unordered",
        "  pair); the outcome with strictly the most votes wins when its share of the pair's",
        "  votes reaches the agreement threshold. With ties dropped a tie vote counts in the",
        "  total but for neither side; with ties kept a tie is a third outcome. The row's",
        "  margin is the mean margin of the winning votes. dawid_skene: one row per pair,",
        "  the outcome Dawid–Skene finds most probable, kept when its posterior reaches the",
        "  agreement threshold.",
        "- rank_gap: rank(rejected) − rank(chosen); likert_gap: likert(chosen) − likert(rejected),",
        "  votes without ratings dropped.",
        "- Standard format: a text prompt ends with one newline; a chat prompt is rendered as",
        "  `Role: content` turns separated by blank lines, ending `Assistant:` and a newline.",
        "- The same options over the same comparisons give the same bytes.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset, load_from_disk",
        "",
        'pairs = load_dataset("json", data_files={"train": "pairs/train.jsonl", "test": "pairs/test.jsonl"})',
        'pairs = load_from_disk("hf")',
        "```",
        "",
    ]
    return "\n".join(lines)


# --- the build -----------------------------------------------------------------------


class _Progress:
    """Counts judgments and reports the build's progress every PROGRESS_EVERY_JUDGMENTS of them."""

    def __init__(self, report: ProgressCallback, total: int) -> None:
        self.report = report
        self.total = max(total, 1)
        self.done = 0

    def tick(self) -> None:
        self.done += 1
        if self.done % PROGRESS_EVERY_JUDGMENTS == 0:
            share = min(self.done / self.total, 1.0)
            self.report(PROGRESS_PROMPTS + (PROGRESS_ROWS_END - PROGRESS_PROMPTS) * share)


def dataset_build_write(*, build: DatasetBuild, progress: ProgressCallback) -> BuildResult:
    """Write every file of the build and move the folder into place; returns counts, summary, hash.

    1. Read the filters once: gold-accuracy exclusions and the newest judgment id.
    2. Split the prompts (near-duplicate groups to one side); find the later
       copies of texts repeated within a task.
    3. Stream comparisons into pair rows, then judgments into grouped, SFT and
       reference rows, in a temporary folder.
    4. Save hf/, write the card, hash, and rename the folder into place.
    Any error removes the temporary folder and propagates.
    """
    root = datasets_root()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-{build.pk}-{uuid.uuid4().hex}"
    staging.mkdir()
    arrow_folder = staging / ".arrow"
    arrow_folder.mkdir()
    outputs: Outputs | None = None
    try:
        options = BuildOptions.from_build(build)
        excluded = dataset_build_excluded_labelers(build=build)
        judgment_id_max = dataset_build_judgment_id_max(build=build)
        # Model judges: left out, kept, or kept when calibrated against the humans (training.judges).
        judges_left_out, judges = dataset_build_judges(
            build=build,
            comparisons=_comparisons_read(build=build, excluded=excluded, judgment_id_max=judgment_id_max),
        )
        split = prompt_split(build=build, options=options)
        repeated = repeated_texts_find(build=build)
        progress(PROGRESS_PROMPTS)

        read_excluded = {
            project_id: sorted(set(excluded.get(project_id, [])) | set(judges_left_out.get(project_id, [])))
            for project_id in excluded.keys() | judges_left_out.keys()
        }
        selection = {"build": build, "excluded": read_excluded, "judgment_id_max": judgment_id_max}
        versions = judgment_versions_read(**selection)
        counter = _Progress(progress, versions.judgments)
        outputs = Outputs(folder=staging, arrow_folder=arrow_folder, options=options, split=split)
        common = {
            **selection,
            "options": options,
            "split": split,
            "outputs": outputs,
            "repeated": repeated,
            "tick": counter.tick,
        }
        pair_stats, judgment_stats = rows_write(**common)
        outputs.close()
        progress(PROGRESS_ROWS_END)

        hf_save(folder=staging, arrow_folder=arrow_folder)
        shutil.rmtree(arrow_folder)
        counts = outputs.counts()
        summary = build_summary(
            build=build,
            options=options,
            split=split,
            pair_stats=pair_stats,
            judgment_stats=judgment_stats,
            repeated=repeated,
            excluded=excluded,
            judges=judges,
            judgment_id_max=judgment_id_max,
            outputs=outputs,
            versions=versions,
        )
        (staging / CARD_FILENAME).write_text(card_render(summary=summary, counts=counts), encoding="utf-8")
        digest = content_hash(staging)

        final = dataset_build_dir(build_id=build.pk)
        if final.exists():
            # Left by an earlier attempt of this same build, which the row says is ours now.
            shutil.rmtree(final)
        os.replace(staging, final)
        return BuildResult(counts=counts, summary=summary, content_hash=digest)
    except BaseException:
        if outputs is not None:
            # The original error is the one to report.
            with contextlib.suppress(Exception):
                outputs.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
