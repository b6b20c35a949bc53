"""What a retrieve must bring, asked from the PACS itself (PS3.4 C.4.1).

A C-MOVE's final status and sub-operation counts are the PACS's own account of
what it did, and some PACS get it wrong: CTN answers Success after skipping
every instance stored in Explicit VR, counting them as warnings it never sent.
A C-FIND at IMAGE level, run beside the move when the pool has an association
to spare (else once the move has ended, on the association it gave back),
lists the SOP Instance UIDs the retrieve should have delivered; the retriever
compares the list with what actually arrived.
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
