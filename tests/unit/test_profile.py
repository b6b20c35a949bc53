"""The per-node DIMSE profile: configuration, the contexts it proposes, name keys
for case-sensitive PACS, completeness against a C-FIND listing, probe output."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.cache import CachedInstance
from app.config import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DimseProfile,
    PacsNode,
    load_settings,
)
from app.dicomweb.attributes import Level
from app.dicomweb.query import QidoQuery
from app.dimse.contexts import query_contexts
from app.dimse.find import QueryModel
from app.dimse.move import MoveProgress, MoveResult
from app.dimse.probe import ProbeReport, profile_toml
from app.errors import InvalidRequest
from app.services.retrieve import Fetch, Target, incomplete_message
from app.services.search import Searcher, case_blind_pattern


def test_default_profile_proposes_explicit_then_implicit() -> None:
    profile = DimseProfile()
    assert profile.transfer_syntaxes == [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]
    assert profile.study_counts and profile.patient_root and not profile.case_sensitive_names


def test_profile_refuses_nonsense() -> None:
    with pytest.raises(ValidationError, match="not transfer syntax UIDs: implicit"):
        DimseProfile(transfer_syntaxes=["implicit"])
    with pytest.raises(ValidationError):
        DimseProfile(transfer_syntaxes=[])
    with pytest.raises(ValidationError):
        DimseProfile(relational=True)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"needs profile\.patient_root"):
        PacsNode(
            name="x",
            ae_title="X",
            host="h",
            port=104,
            query_model="patient",
            profile=DimseProfile(patient_root=False),
        )


def test_profile_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        '[[nodes]]\nname = "ctn"\nae_title = "CTNAE"\nhost = "127.0.0.1"\nport = 24300\n'
        '[nodes.profile]\ntransfer_syntaxes = ["1.2.840.10008.1.2"]\nstudy_counts = false\n'
    )
    [node] = load_settings(config).nodes
    assert node.profile.transfer_syntaxes == [IMPLICIT_VR_LITTLE_ENDIAN]
    assert node.profile.study_counts is False
    assert node.expected_instances == "find"


def test_contexts_follow_the_profile() -> None:
    implicit_only = query_contexts(DimseProfile(transfer_syntaxes=[IMPLICIT_VR_LITTLE_ENDIAN]))
    assert {syntaxes for _, syntaxes in implicit_only} == {(IMPLICIT_VR_LITTLE_ENDIAN,)}
    classes = {c for c, _ in query_contexts(DimseProfile(patient_root=False))}
    assert QueryModel.STUDY_ROOT.value in classes
    assert QueryModel.PATIENT_ROOT.value not in classes
    assert QueryModel.PATIENT_ROOT.value in {c for c, _ in implicit_only}


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("doe*", "???*"),
        ("Doe^John", "???^????"),
        ("Müller*", "?*????*"),
        ("山田*", "**"),
        ("*", "*"),
        ("O'Brien 2", "?'????? 2"),
    ],
)
def test_case_blind_pattern(value: str, sent: str) -> None:
    assert case_blind_pattern(value) == sent


def _instance(sop: str) -> CachedInstance:
    return CachedInstance(
        sop, "1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2", 1, Path("/x")
    )


def test_a_success_with_listed_instances_missing_is_incomplete() -> None:
    """CTN's case: Success, counts that look plausible, one listed instance never sent."""
    loop = asyncio.new_event_loop()
    try:
        fetch = Fetch(Target("ctn", "1.2", "1.2.3"), 1, "CTNAE", loop)
        fetch.arrived = [_instance("1.2.3.1"), _instance("1.2.3.2")]
        fetch.result = MoveResult(status=0, progress=MoveProgress(completed=2))
        assert fetch.missing == 0
        fetch.expected = frozenset({"1.2.3.1", "1.2.3.2", "1.2.3.3"})
        assert fetch.not_arrived == {"1.2.3.3"}
        assert fetch.missing == 1
        assert "1 of the 3 instances the PACS lists never arrived" in incomplete_message(fetch)
    finally:
        loop.close()


def test_probe_output_pastes_into_the_configuration(tmp_path: Path) -> None:
    node = PacsNode(name="ctn", ae_title="CTNAE", host="127.0.0.1", port=24300)
    report = ProbeReport(
        profile=DimseProfile(transfer_syntaxes=[IMPLICIT_VR_LITTLE_ENDIAN], study_counts=False),
        echo_ms=1.5,
        peer_max_pdu=16384,
        accepted={QueryModel.STUDY_ROOT.value: [IMPLICIT_VR_LITTLE_ENDIAN]},
        notes=['a "quoted" note'],
    )
    text = profile_toml(node, report)
    assert tomllib.loads(text)["nodes"][0]["profile"]["study_counts"] is False
    config = tmp_path / "gw.toml"
    config.write_text(text)
    [loaded] = load_settings(config).nodes
    assert loaded.profile == report.profile
    assert (loaded.name, loaded.ae_title, loaded.port) == ("ctn", "CTNAE", 24300)


def test_patients_on_a_node_without_patient_root_is_a_clear_400() -> None:
    node = PacsNode(
        name="legacy", ae_title="X", host="h", port=104, profile=DimseProfile(patient_root=False)
    )
    searcher = Searcher(node, None, QidoQuery(level=Level.PATIENT))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="does not answer Patient Root"):
        asyncio.run(searcher.run())
