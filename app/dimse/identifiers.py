"""C-FIND Identifiers built from the query model (PS3.4 C.4.1.2.1, C.2.2.2)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from app.dicomweb.attributes import Level, vr_of
from app.dicomweb.query import MatchKey

UTF8 = "ISO_IR 192"


def build_identifier(
    level: Level,
    matches: Sequence[MatchKey],
    return_tags: Iterable[int],
) -> Dataset:
    """Build the Identifier of a C-FIND at *level*.

    *matches* are the keys sent to the PACS (the caller has already dropped those
    the model does not allow at this level); *return_tags* become universal
    (zero-length) keys, which ask the PACS to return the attribute.  Values
    with non-ASCII characters make the Identifier UTF-8 (ISO_IR 192): without a
    declared character set their matching is undefined (PS3.4 C.2.2.2).
    """
    ds = Dataset()
    non_ascii = any(not k.value.isascii() for k in matches)
    if non_ascii:
        ds.SpecificCharacterSet = UTF8
    ds.QueryRetrieveLevel = level.value
    for tag in sorted(set(return_tags)):
        if tag in ds:
            continue
        vr = vr_of(tag)
        ds.add_new(tag, vr, DicomSequence([]) if vr == "SQ" else None)
    for key in matches:
        if len(key.path) == 1:
            value = DicomSequence([]) if key.vr == "SQ" else key.value or None
            ds[key.tag] = _key_element(key.tag, key.vr, value)
        else:
            item = Dataset()
            item[key.path[1]] = _key_element(key.path[1], key.vr, key.value or None)
            ds.add_new(key.tag, "SQ", DicomSequence([item]))
    return ds


def _key_element(tag: int, vr: str, value: object) -> DataElement:
    # A key is not a stored value: "CT*" and "20200101-20200131" are valid
    # matching keys (C.2.2.2.4-5) that pydicom's value checks would warn about.
    # query.py has already checked each key against its VR.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)
