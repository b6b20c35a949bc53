"""What a retrieve must bring, asked from the PACS itself (PS3.4 C.4.1).

A C-MOVE's final status and sub-operation counts are the PACS's own account of
what it did, and some PACS get it wrong: CTN answers Success after skipping
every instance stored in Explicit VR, counting them as warnings it never sent.
Once the move has ended (on the association it gave back), the PACS is asked
what the retrieve should have delivered.  A PACS that counts natively answers
one C-FIND with NumberOfSeriesRelatedInstances (or NumberOfStudyRelatedInstances):
when everything counted arrived, that is the whole check.  Otherwise (a
shortfall to name, or a PACS without counts) a C-FIND at IMAGE level lists the
SOP Instance UIDs, and the retriever compares the list with what arrived.

The listing is not run beside the move: 300 C-FIND answers decoded while
Orthanc sends the same series halved the cold retrieve's throughput (the count
query costs one answer).
"""

from __future__ import annotations

import asyncio
import logging

from app.dicomweb.attributes import UNIQUE_KEY, Level, keyword
from app.dicomweb.query import MatchKey
from app.dimse.find import QueryModel, c_find
from app.dimse.identifiers import build_identifier
from app.dimse.pool import AssociationPool
from app.errors import GatewayError

log = logging.getLogger(__name__)


def _uid_key(level: Level, uid: str) -> MatchKey:
    tag = UNIQUE_KEY[level]
    return MatchKey((tag,), "UI", uid, level, keyword(tag))


async def _uids(pool: AssociationPool, level: Level, parents: list[MatchKey]) -> set[str]:
    tag = UNIQUE_KEY[level]
    found = await c_find(pool, build_identifier(level, parents, {tag}), QueryModel.STUDY_ROOT)
    out = set()
    for ds in found.matches:
        elem = ds.get(tag)
        if elem is not None and elem.value:
            out.add(str(elem.value).strip("\x00 "))
    return out


_SERIES_COUNT = 0x00201209  # NumberOfSeriesRelatedInstances
_STUDY_COUNT = 0x00201208  # NumberOfStudyRelatedInstances


async def expected_count(pool: AssociationPool, study: str, series: str | None) -> int | None:
    """The number of instances the PACS says the series (or study) holds, or None
    when it does not say (no single answer, no count, or the C-FIND failed)."""
    level, tag = (Level.SERIES, _SERIES_COUNT) if series else (Level.STUDY, _STUDY_COUNT)
    keys = [_uid_key(Level.STUDY, study)]
    if series:
        keys.append(_uid_key(Level.SERIES, series))
    try:
        found = await c_find(pool, build_identifier(level, keys, {tag}), QueryModel.STUDY_ROOT)
    except GatewayError as exc:
        log.info("no instance count for %s on %s: %s", series or study, pool.node.name, exc)
        return None
    if len(found.matches) != 1:
        return None
    elem = found.matches[0].get(tag)
    try:
        return int(elem.value) if elem is not None and elem.value not in (None, "") else None
    except (TypeError, ValueError):
        return None


async def expected_instances(
    pool: AssociationPool, study: str, series: str | None = None
) -> frozenset[str] | None:
    """The SOP Instance UIDs the PACS lists for a study or series, or None when
    it cannot say (the C-FIND failed: then only the move's counts are left)."""
    study_key = _uid_key(Level.STUDY, study)
    try:
        series_uids = [series] if series else sorted(await _uids(pool, Level.SERIES, [study_key]))
        found = await asyncio.gather(
            *(
                _uids(pool, Level.IMAGE, [study_key, _uid_key(Level.SERIES, uid)])
                for uid in series_uids
            )
        )
    except GatewayError as exc:
        log.warning(
            "could not list the instances of %s on %s: %s; trusting the move's counts",
            series or study,
            pool.node.name,
            exc.message,
        )
        return None
    return frozenset().union(*found)


async def holds(
    pool: AssociationPool, study: str, series: str | None = None, sop: str | None = None
) -> bool | None:
    """Whether the PACS lists this study, series or instance: one C-FIND at its
    level with every UID as a key; None when the C-FIND fails (it cannot say)."""
    keys = [_uid_key(Level.STUDY, study)]
    level = Level.STUDY
    if series:
        keys.append(_uid_key(Level.SERIES, series))
        level = Level.SERIES
    if series and sop:
        keys.append(_uid_key(Level.IMAGE, sop))
        level = Level.IMAGE
    try:
        return bool(await _uids(pool, level, keys))
    except GatewayError as exc:
        log.info(
            "could not tell whether %s is on %s: %s", sop or series or study, pool.node.name, exc
        )
        return None
