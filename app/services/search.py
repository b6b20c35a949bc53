"""QIDO-RS searches carried out as hierarchical C-FINDs (PS3.18 §10.6, PS3.4 C.4.1).

A DIMSE PACS answers baseline *hierarchical* queries: one level at a time, with
the unique key of every level above it (PS3.4 C.4.1.2.1).  DICOMweb asks for
more: relational resources (``/series``, ``/instances``), attributes of other
levels as match keys, and attributes the PACS does not keep.  The planner here
walks the hierarchy top-down, querying a level only when a match key, a return
attribute or an unknown parent UID makes it necessary, then checks every match
key itself, because a PACS silently ignores keys it does not support.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from app.config import PacsNode
from app.dicomweb.attributes import UNIQUE_KEY, Level, keyword, level_of
from app.dicomweb.matching import matches as match_one
from app.dicomweb.matching import time_key_for_pacs
from app.dicomweb.query import MatchKey, QidoQuery
from app.dimse import status as st
from app.dimse.find import FindResult, QueryModel, c_find
from app.dimse.identifiers import build_identifier
from app.dimse.pool import AssociationPool
from app.errors import InvalidRequest
from app.runtime import Gateway

log = logging.getLogger(__name__)

_MODALITIES_IN_STUDY = 0x00080061
_STUDY_SERIES_COUNT = 0x00201206
_STUDY_INSTANCE_COUNT = 0x00201208
_SERIES_INSTANCE_COUNT = 0x00201209
_MODALITY = 0x00080060
_DERIVABLE_STUDY = frozenset({_MODALITIES_IN_STUDY, _STUDY_SERIES_COUNT, _STUDY_INSTANCE_COUNT})
_DERIVABLE = _DERIVABLE_STUDY | {_SERIES_INSTANCE_COUNT}
_COUNTS = _DERIVABLE - {_MODALITIES_IN_STUDY}


@dataclass
class SearchResult:
    """Matches at the query level, each carrying the attributes to return."""

    matches: list[Dataset] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Matches left after offset+limit, if known; None when the scan stopped early.
    remaining: int | None = 0
    truncated: bool = False


@dataclass
class _Row:
    """One path down the hierarchy: the answer at each level queried so far."""

    uids: dict[Level, str]
    data: dict[Level, Dataset]


class Searcher:
    """Runs one QIDO query against one node."""

    def __init__(self, node: PacsNode, pool: AssociationPool, query: QidoQuery) -> None:
        self.node = node
        self.pool = pool
        self.query = query
        self.study_root = query.level is not Level.PATIENT and node.query_model == "study"
        self.model = QueryModel.STUDY_ROOT if self.study_root else QueryModel.PATIENT_ROOT
        self.profile = node.profile
        self.warnings: list[str] = list(query.warnings)
        self._unjudged: set[str] = set()
        # Warning statuses the PACS ended C-FINDs with (PS3.4 C.4.1.1.4 has none,
        # but PACS send them): the answer stands, the client is told.
        self._pacs_warnings: set[int] = set()
        self._capped = False
        # The target-level C-FIND was cancelled once offset+limit+1 matches arrived.
        self._cut = False
        self._fanout = asyncio.Semaphore(node.max_associations)
        self._by_level: dict[Level, list[MatchKey]] = {lvl: [] for lvl in Level}
        for key in query.matches:
            self._by_level[level_of(key.tag, study_root=self.study_root)].append(key)

    # -- planning ----------------------------------------------------------

    def _chain(self) -> list[Level]:
        top = Level.STUDY if self.study_root else Level.PATIENT
        return [lvl for lvl in Level if top.depth <= lvl.depth <= self.query.level.depth]

    def _known_uids(self, level: Level) -> list[str] | None:
        """UIDs of *level* fixed by an exact match key, else None."""
        key = next((k for k in self._by_level[level] if k.tag == UNIQUE_KEY[level]), None)
        if key is None or key.is_universal or key.has_wildcard:
            return None
        return key.value.split("\\")

    def _must_query(self, level: Level) -> bool:
        if level is self.query.level or level in self.query.context_levels:
            return True
        unique = UNIQUE_KEY[level]
        others = [k for k in self._by_level[level] if k.tag != unique]
        return bool(others) or self._known_uids(level) is None

    # -- execution ---------------------------------------------------------

    async def run(self) -> SearchResult:
        q = self.query
        if q.level is Level.PATIENT and not self.profile.patient_root:
            raise InvalidRequest(
                f"node {self.node.name!r} does not answer Patient Root queries "
                "(profile.patient_root = false): search /studies instead"
            )
        if q.contradictory:
            return SearchResult(warnings=self.warnings)
        want = None if q.limit is None else q.offset + q.limit + 1
        below = [lvl for lvl in Level if lvl.depth > q.level.depth and self._by_level[lvl]]
        if below or any(k.tag in _DERIVABLE for k in q.matches):
            # Those keys are judged after the target level's C-FIND (derived
            # attributes, sub-searches): stopping it early could lose matches.
            want = None
        rows: list[_Row] = [_Row(uids={}, data={})]
        chain = self._chain()
        for level in chain:
            is_target = level is q.level
            if not self._must_query(level):
                uids = self._known_uids(level) or []
                rows = [_Row({**r.uids, level: u}, dict(r.data)) for r in rows for u in uids]
                continue
            rows = await self._expand(rows, level, want if is_target else None)
            if not rows:
                break
        rows = await self._derive(rows)
        # Every level's keys again, not only the target's: a key of an upper level
        # the PACS ignored (ModalitiesInStudy in /series on a PACS that does not
        # keep it) is derived only now, and one it does not return must be named.
        rows = [
            r
            for r in rows
            if all(self._accept(ds, level, final=True) for level, ds in r.data.items())
        ]
        rows = await self._filter_below(rows)
        result = SearchResult(warnings=self.warnings)
        for code in sorted(self._pacs_warnings):
            result.warnings.append(
                f"The PACS ended a C-FIND with warning status 0x{code:04X} "
                f"({st.meaning(code)}); its answers are included as they came."
            )
        for name in sorted(self._unjudged):
            result.warnings.append(
                f"The PACS did not return {name}, so results were not filtered on it."
            )
        total = len(rows)
        start = min(q.offset, total)
        end = total if q.limit is None else min(total, start + q.limit)
        page = rows[start:end]
        result.matches = await asyncio.to_thread(lambda: [self._assemble(r) for r in page])
        result.truncated = self._capped
        result.remaining = None if (self._capped or self._cut) else total - end
        if self._cut and end < total:
            result.warnings.append("There are additional results that can be requested.")
        elif result.remaining:
            result.warnings.append(
                f"There are {result.remaining} additional results that can be requested."
            )
        if self._capped:
            result.warnings.append(
                f"The search stopped after {self.node.max_results} matches (the node's "
                "max_results); narrow the query to see the rest."
            )
        return result

    async def _find(
        self,
        ident: Dataset,
        *,
        max_matches: int | None = None,
        accept: Callable[[Dataset], bool] | None = None,
    ) -> FindResult:
        found = await c_find(self.pool, ident, self.model, max_matches=max_matches, accept=accept)
        if st.category(found.status) is st.Category.WARNING:
            self._pacs_warnings.add(found.status)
        return found

    async def _expand(self, rows: list[_Row], level: Level, want: int | None) -> list[_Row]:
        """Query *level* under each row; the answers become the new rows."""
        return_tags = self._return_tags(level)
        keys = [self._sent(k) for k in self._by_level[level] if self._pacs_matches(k)]
        # One budget for the whole level, shared by the parallel C-FINDs of a
        # fan-out, so that no search holds more than max_results answers.
        budget = [self.node.max_results]
        budget_lock = threading.Lock()

        async def one(row: _Row) -> list[_Row]:
            parents = [_unique_match(lvl, uid) for lvl, uid in row.uids.items()]
            ident = build_identifier(level, [*parents, *keys], return_tags)
            limit = want if len(rows) == 1 else None
            cap = min(self.node.max_results, limit) if limit else self.node.max_results
            unique = UNIQUE_KEY[level]
            accepted: set[str] = set()

            def accept(ds: Dataset) -> bool:
                # Runs in the C-FIND's worker thread, one answer at a time.  Some
                # PACS (qrscp) answer once per instance at every level: repeats
                # must not count towards the limit.
                uid = _text(ds, unique)
                if not uid or uid in accepted or not self._accept(ds, level):
                    return False
                with budget_lock:
                    if budget[0] <= 0:
                        self._capped = True
                        return False
                    budget[0] -= 1
                accepted.add(uid)
                # Decode here, on the C-FIND's thread, not on the event loop.
                _decode(ds)
                return True

            async with self._fanout:
                found = await self._find(ident, max_matches=cap, accept=accept)
            if found.truncated:
                if limit is not None and cap == limit:
                    self._cut = True
                else:
                    self._capped = True
            out = []
            for ds in found.matches:
                uid = _text(ds, unique)
                out.append(_Row({**row.uids, level: uid}, {**row.data, level: ds}))
            return out

        results: list[_Row] = []
        for chunk in await asyncio.gather(*(one(r) for r in rows)):
            results.extend(chunk)
        return results

    def _pacs_matches(self, key: MatchKey) -> bool:
        """Whether the key goes to the PACS as a match key.

        Counts are only ever returned and matched here: Orthanc returns them but
        matches a count key against stored attributes and finds nothing.
        ModalitiesInStudy goes only to a PACS that keeps it.
        """
        if key.tag in _COUNTS:
            return False
        return self.profile.study_counts or key.tag not in _DERIVABLE

    def _sent(self, key: MatchKey) -> MatchKey:
        """The key as the PACS sees it.

        Few PACS negotiate fuzzy semantic matching (PS3.4 C.2.2.2.8), so with
        ``fuzzymatching=true`` names go to the PACS as universal keys and the
        gateway matches them itself (case- and accent-free, by name component).
        A PACS that matches names case-sensitively gets each letter as ``?``
        (PS3.4 C.2.2.2.4): it returns a superset that the gateway then matches
        without regard to case, as PS3.4 C.2.2.2.1 allows for PN.  A list of
        codes goes as a universal key, matched here.  Times go as ranges at full
        precision (``time_key_for_pacs``), a ``?`` wild card as ``*``.
        """
        if key.vr == "CS" and "\\" in key.value:
            # Baseline C-FIND takes one value per key (lists are for UIDs only,
            # PS3.4 C.2.2.2.2): the PACS returns every value, the gateway matches.
            return MatchKey(key.path, key.vr, "", key.level, key.parameter)
        if key.has_wildcard and "?" in key.value:
            # A '?' is one character (PS3.4 C.2.2.2.4), but PACS that compare bytes
            # (Orthanc) take it for one byte: M?ller missed Müller. Sent as '*',
            # matched here exactly.
            widened = re.sub(r"\*+", "*", key.value.replace("?", "*"))
            key = MatchKey(key.path, key.vr, widened, key.level, key.parameter)
        if key.vr == "TM" and key.value:
            return MatchKey(
                key.path, key.vr, time_key_for_pacs(key.value), key.level, key.parameter
            )
        if key.vr == "PN" and key.value:
            if self.query.fuzzymatching:
                return MatchKey(key.path, key.vr, "", key.level, key.parameter)
            value = key.value
            if self.profile.case_sensitive_names:
                value = case_blind_pattern(value)
            if "=" not in value and not value.endswith("*"):
                # A key of one component group matches a name's groups on their
                # own here; Orthanc and dcmqrscp match it against the whole value,
                # so Yamada^Tarou missed Yamada^Tarou=山田^太郎=やまだ^たろう.
                value += "*"
            return MatchKey(key.path, key.vr, value, key.level, key.parameter)
        return key

    def _return_tags(self, level: Level) -> set[int]:
        q = self.query
        if level is q.level or level in q.context_levels:
            tags = {
                t
                for t in q.return_tags(level)
                if level_of(t, study_root=self.study_root) is level or t == UNIQUE_KEY[level]
            }
            if level is Level.STUDY and not self.study_root:
                tags -= {t for t in tags if level_of(t, study_root=False) is Level.PATIENT}
            if not self.profile.study_counts:
                tags -= _DERIVABLE
            return tags
        return {UNIQUE_KEY[level]}

    def _accept(self, ds: Dataset, level: Level, *, final: bool = False) -> bool:
        """Check the match keys of *level* against an answer.

        Keys the answer lacks cannot be judged: the answer is kept (a PACS that
        ignores a key returns unfiltered answers) and a Warning says so.
        """
        for key in self._by_level[level]:
            verdict = match_one(ds, key, fuzzy=self.query.fuzzymatching)
            if verdict is False:
                return False
            if verdict is None and final and key.tag not in _DERIVABLE:
                self._unjudged.add(key.parameter)
        return True

    def _explicit(self, tag: int) -> bool:
        """The client named *tag* (includefield, ``all`` or a match key), not just
        the default return attributes."""
        q = self.query
        return q.include_all or tag in q.includefields or any(k.tag == tag for k in q.matches)

    async def _derive(self, rows: list[_Row]) -> list[_Row]:
        """Fill count attributes the PACS did not return, from lower-level queries.

        ModalitiesInStudy and the related counts are optional keys many PACS do
        not keep (dcmqrscp, qrscp, CTN); clients still filter and display them.
        ModalitiesInStudy and NumberOfStudyRelatedSeries cost one SERIES C-FIND
        per study.  Instance counts a PACS does not give cost one IMAGE C-FIND per
        series, so they are derived only when the client named them.
        """
        q = self.query
        levels = (q.level, *q.context_levels)
        # A study match key is judged whatever the resource: in
        # /studies/{study}/series too, where no study attribute is returned.
        study_wanted = {k.tag for k in self._by_level[Level.STUDY]}
        if Level.STUDY in levels:
            study_wanted |= q.return_tags(Level.STUDY)
        study_wanted &= _DERIVABLE_STUDY
        series_count = Level.SERIES in levels and self._explicit(_SERIES_INSTANCE_COUNT)

        def lacks(row: _Row, level: Level, tags: set[int]) -> bool:
            ds = row.data.get(level)
            return ds is not None and any(not _present(ds, t) for t in tags)

        study_todo = [r for r in rows if study_wanted and lacks(r, Level.STUDY, study_wanted)]
        series_todo = [
            r for r in rows if series_count and lacks(r, Level.SERIES, {_SERIES_INSTANCE_COUNT})
        ]
        await asyncio.gather(
            *(self._fill_study(r, study_wanted) for r in study_todo),
            *(self._fill_series(r) for r in series_todo),
        )
        return rows

    def _parents(self, row: _Row, *levels: Level) -> list[MatchKey]:
        return [_unique_match(lvl, uid) for lvl, uid in row.uids.items() if lvl in levels]

    async def _count_instances(self, parents: list[MatchKey]) -> int:
        ident = build_identifier(Level.IMAGE, parents, {UNIQUE_KEY[Level.IMAGE]})
        async with self._fanout:
            found = await self._find(ident)
        return len({_text(ds, UNIQUE_KEY[Level.IMAGE]) for ds in found.matches} - {""})

    async def _fill_series(self, row: _Row) -> None:
        parents = self._parents(row, Level.PATIENT, Level.STUDY, Level.SERIES)
        row.data[Level.SERIES].NumberOfSeriesRelatedInstances = await self._count_instances(parents)

    async def _fill_study(self, row: _Row, wanted: set[int]) -> None:
        study = row.data[Level.STUDY]
        parents = self._parents(row, Level.PATIENT, Level.STUDY)
        return_tags = {UNIQUE_KEY[Level.SERIES], _MODALITY}
        if self.profile.study_counts:
            return_tags.add(_SERIES_INSTANCE_COUNT)
        ident = build_identifier(Level.SERIES, parents, return_tags)
        async with self._fanout:
            found = await self._find(ident)
        # Keyed by series UID: some PACS repeat a series once per instance.
        series = {_text(ds, UNIQUE_KEY[Level.SERIES]): ds for ds in found.matches}
        series.pop("", None)
        modalities = sorted({_text(ds, _MODALITY) for ds in series.values()} - {""})
        if _MODALITIES_IN_STUDY in wanted and not _present(study, _MODALITIES_IN_STUDY):
            study.ModalitiesInStudy = modalities
        if _STUDY_SERIES_COUNT in wanted and not _present(study, _STUDY_SERIES_COUNT):
            study.NumberOfStudyRelatedSeries = len(series)
        if _STUDY_INSTANCE_COUNT not in wanted or _present(study, _STUDY_INSTANCE_COUNT):
            return
        counts = [ds.get(_SERIES_INSTANCE_COUNT) for ds in series.values()]
        if counts and all(c is not None and str(c.value).strip() for c in counts):
            study.NumberOfStudyRelatedInstances = sum(int(c.value) for c in counts if c is not None)
        elif self._explicit(_STUDY_INSTANCE_COUNT):
            totals = await asyncio.gather(
                *(
                    self._count_instances([*parents, _unique_match(Level.SERIES, uid)])
                    for uid in series
                )
            )
            study.NumberOfStudyRelatedInstances = sum(totals)

    async def _filter_below(self, rows: list[_Row]) -> list[_Row]:
        """Keep rows with at least one child matching the keys of lower levels."""
        q = self.query
        below = [lvl for lvl in Level if lvl.depth > q.level.depth and self._by_level[lvl]]
        if not below or not rows:
            return rows
        keys = [k for lvl in below for k in self._by_level[lvl]]

        async def keep(row: _Row) -> bool:
            # A search one level down under this row; the sub-searcher walks any
            # intermediate level (an instance key in a study search).
            parents = [_unique_match(lvl, uid) for lvl, uid in row.uids.items()]
            sub_query = QidoQuery(level=below[-1], matches=[*parents, *keys], limit=1)
            sub = Searcher(self.node, self.pool, sub_query)
            found = await sub.run()
            self._unjudged |= sub._unjudged
            return bool(found.matches)

        verdicts = await asyncio.gather(*(keep(r) for r in rows))
        return [r for r, ok in zip(rows, verdicts, strict=True) if ok]

    def _assemble(self, row: _Row) -> Dataset:
        q = self.query
        out = Dataset()
        # The UIDs above the result's level: clients need them to build URLs
        # (RetrieveURL), and most servers, Orthanc's plugin included, return them.
        for level, uid in row.uids.items():
            if level in (Level.STUDY, Level.SERIES) and level.depth < q.level.depth:
                out.add_new(UNIQUE_KEY[level], "UI", uid)
        for level in (*q.context_levels, q.level):
            ds = row.data.get(level)
            if ds is None:
                continue
            for tag in q.return_tags(level):
                if tag in ds:
                    out[tag] = ds[tag]
        return out


def _unique_match(level: Level, uid: str) -> MatchKey:
    tag = UNIQUE_KEY[level]
    return MatchKey((tag,), "LO" if level is Level.PATIENT else "UI", uid, level, keyword(tag))


def case_blind_pattern(value: str) -> str:
    """A PN match value a case-sensitive PACS matches regardless of case.

    ASCII letters become ``?``; other non-ASCII characters become ``*``, because a
    PACS may compare bytes and a ``?`` would stand for one byte of a multi-byte
    UTF-8 character.  Wildcards and separators stay.
    """
    out: list[str] = []
    for char in value:
        if char.isascii() and char.isalpha():
            out.append("?")
        elif not char.isascii():
            if not out or out[-1] != "*":
                out.append("*")
        else:
            out.append(char)
    return "".join(out)


def _text(ds: Dataset, tag: int) -> str:
    elem = ds.get(tag)
    if elem is None or elem.value is None:
        return ""
    return str(elem.value).strip()


def _present(ds: Dataset, tag: int) -> bool:
    return tag in ds and not ds[tag].is_empty


def _decode(ds: Dataset) -> None:
    """Decode text with the answer's own character set, then forget the charset.

    Rows merge answers from several C-FINDs whose character sets may differ
    (dcmqrscp answers each record in the charset it was stored in).
    """
    ds.decode()
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


async def run_search(gateway: Gateway, node: PacsNode, query: QidoQuery) -> SearchResult:
    """Run a QIDO search against *node*."""
    return await Searcher(node, gateway.pool(node), query).run()
