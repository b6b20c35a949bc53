"""Small C-FIND lookups that retrieves need."""

from __future__ import annotations

from pydicom.dataset import Dataset

from app.config import PacsNode
from app.dimse.find import QueryModel, c_find
from app.runtime import Gateway


async def series_of_study(gateway: Gateway, node: PacsNode, study: str) -> list[str]:
    """The SeriesInstanceUIDs of a study, in the PACS's order, each once."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = study
    ident.SeriesInstanceUID = None
    found = await c_find(gateway.pool(node), ident, QueryModel.STUDY_ROOT)
    out: list[str] = []
    for ds in found.matches:
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if uid and uid not in out:
            out.append(uid)
    return out
