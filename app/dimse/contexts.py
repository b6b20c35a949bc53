"""Presentation contexts the gateway proposes for queries and retrieves (PS3.8 7.1.1.13).

The transfer syntaxes come from the node's profile: a PACS that misreads
identifiers in Explicit VR (CTN) is offered Implicit VR Little Endian alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.config import DimseProfile
from app.dimse.find import VERIFICATION, QueryModel
from app.dimse.move import MoveModel

Contexts = tuple[tuple[str, tuple[str, ...]], ...]


def query_contexts(profile: DimseProfile) -> Contexts:
    """Verification, FIND and MOVE in both models, each with the profile's syntaxes.

    Patient Root goes in only when the PACS accepts it: some PACS reject the whole
    association when one proposed context is unknown to them.
    """
    syntaxes = tuple(profile.transfer_syntaxes)
    classes: Sequence[str] = (
        VERIFICATION,
        QueryModel.STUDY_ROOT.value,
        MoveModel.STUDY_ROOT.value,
        *(
            (QueryModel.PATIENT_ROOT.value, MoveModel.PATIENT_ROOT.value)
            if profile.patient_root
            else ()
        ),
    )
    return tuple((sop_class, syntaxes) for sop_class in classes)
