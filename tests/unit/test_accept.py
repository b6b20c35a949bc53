"""WADO-RS media type negotiation (PS3.18 §8.7), with the Accept values real clients send."""

from __future__ import annotations

import pytest

from app.dicomweb.accept import Negotiated, ResourceKind, negotiate
from app.errors import InvalidRequest, NotAcceptable

EVRLE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"

INSTANCES = ResourceKind.INSTANCES
METADATA = ResourceKind.METADATA
FRAMES = ResourceKind.FRAMES
BULKDATA = ResourceKind.BULKDATA

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
MULTIPART_OCTETS = 'multipart/related; type="application/octet-stream"'


def dicom(ts: str) -> Negotiated:
    return Negotiated(MULTIPART_DICOM, "application/dicom", ts)


def octets(ts: str) -> Negotiated:
    return Negotiated(MULTIPART_OCTETS, "application/octet-stream", ts)


DICOM_JSON = Negotiated("application/dicom+json", "application/dicom+json", None)


# -- what clients send (CONFORMANCE-NOTES §3.2, §8) -------------------------------------------


@pytest.mark.parametrize(
    ("client", "resource", "header", "expected"),
    [
        (
            "OHIF frames, quoted (generateAcceptHeader.ts)",
            FRAMES,
            'multipart/related; type="application/octet-stream"; transfer-syntax="*"',
            octets("*"),
        ),
        (
            "OHIF frames, transfer-syntax repeated",
            FRAMES,
            'multipart/related; type="application/octet-stream"; transfer-syntax="*"; '
            'transfer-syntax="*"',
            octets("*"),
        ),
        (
            "OHIF 3.13 / cornerstone frames, unquoted (wadors/loadImage.ts)",
            FRAMES,
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            octets("*"),
        ),
        (
            "OHIF series metadata",
            METADATA,
            "application/dicom+json",
            DICOM_JSON,
        ),
        (
            "dicomweb-client retrieve_study/series: no transfer syntax",
            INSTANCES,
            'multipart/related; type="application/dicom"',
            dicom(EVRLE),
        ),
        (
            "dicomweb-client retrieve_instance",
            INSTANCES,
            'multipart/related; type="application/dicom"; transfer-syntax=*',
            dicom("*"),
        ),
        (
            "dicomweb-client retrieve_*_metadata",
            METADATA,
            "application/dicom+json, application/json",
            DICOM_JSON,
        ),
        (
            "dicomweb-client retrieve_instance_frames",
            FRAMES,
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            octets("*"),
        ),
        (
            "dicomweb-client retrieve_bulkdata",
            BULKDATA,
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            octets("*"),
        ),
    ],
)
def test_real_client_headers(
    client: str, resource: ResourceKind, header: str, expected: Negotiated
) -> None:
    assert negotiate(resource, header, []) == expected, client


def test_ohif_with_a_configured_compressed_syntax_gets_that_media_type() -> None:
    # OHIF's requestTransferSyntaxUID maps JPEG-LS to type=image/jls (Table 8.7.3-5).
    got = negotiate(FRAMES, f"multipart/related; type=image/jls; transfer-syntax={JPEG_LS}", [])
    assert got == Negotiated('multipart/related; type="image/jls"', "image/jls", JPEG_LS)


@pytest.mark.parametrize(
    "image", ["image/jpeg", "image/jls", "image/jp2", "image/jpx", "image/jphc", "image/dicom-rle"]
)
def test_compressed_frame_types_without_a_syntax_take_any_stored_one(image: str) -> None:
    got = negotiate(FRAMES, f'multipart/related; type="{image}"', [])
    assert got == Negotiated(f'multipart/related; type="{image}"', image, "*")
    assert negotiate(FRAMES, image, [], single=True) == Negotiated(image, image, "*")


def test_a_compressed_frame_type_with_a_syntax_of_another_type_is_not_acceptable() -> None:
    with pytest.raises(NotAcceptable, match="is not one of image/jpeg"):
        negotiate(FRAMES, f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_LS}", [])
    # ... unless a lower-q alternative can be served.
    got = negotiate(
        FRAMES,
        f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_LS}, {MULTIPART_OCTETS};q=0.5",
        [],
    )
    assert got.part_type == "application/octet-stream"


def test_with_the_stored_syntax_known_a_compressed_type_it_is_not_stored_in_is_passed_over() -> (
    None
):
    both = f'multipart/related; type="image/jpeg", {MULTIPART_OCTETS}'
    jpeg_lossless = "1.2.840.10008.1.2.4.70"
    assert negotiate(FRAMES, both, [], stored_syntax=jpeg_lossless).part_type == "image/jpeg"
    assert negotiate(FRAMES, both, [], stored_syntax=EVRLE) == octets(EVRLE)
    assert negotiate(FRAMES, both, [], stored_syntax=JPEG_LS) == octets(EVRLE)
    with pytest.raises(NotAcceptable, match="sent as stored, and this instance is stored in"):
        negotiate(FRAMES, 'multipart/related; type="image/jpeg"', [], stored_syntax=JPEG_LS)
    asked = f"multipart/related; type=image/jpeg; transfer-syntax={jpeg_lossless}"
    with pytest.raises(NotAcceptable, match=r"stored in 1\.2\.840\.10008\.1\.2\.4\.50"):
        negotiate(FRAMES, asked, [], stored_syntax="1.2.840.10008.1.2.4.50")


def test_compressed_frame_types_are_for_frames_only() -> None:
    with pytest.raises(NotAcceptable):
        negotiate(INSTANCES, 'multipart/related; type="image/jpeg"', [])
    with pytest.raises(NotAcceptable):
        negotiate(BULKDATA, "image/jpeg", [])


def test_single_part_octet_stream_for_one_frame_or_bulk_data() -> None:
    # OHIF configured with acceptHeader ['application/octet-stream'] (dcm4chee set-ups).
    single = Negotiated("application/octet-stream", "application/octet-stream", EVRLE)

    assert negotiate(FRAMES, "application/octet-stream", [], single=True) == single
    assert negotiate(BULKDATA, "application/octet-stream", []) == single
    with pytest.raises(NotAcceptable, match="single item"):
        negotiate(FRAMES, "application/octet-stream", [])


def test_single_part_application_dicom_only_for_one_instance() -> None:
    # Table 10.4.4-1 note 3: single-part types are ignored for multi-item resources.
    assert negotiate(INSTANCES, "application/dicom", [], single=True) == Negotiated(
        "application/dicom", "application/dicom", EVRLE
    )
    with pytest.raises(NotAcceptable):
        negotiate(INSTANCES, "application/dicom", [])


# -- defaults (§8.7.5, §8.7.8) ---------------------------------------------------------------


DEFAULTS = {
    INSTANCES: dicom(EVRLE),
    METADATA: DICOM_JSON,
    ResourceKind.SEARCH: DICOM_JSON,
    FRAMES: octets(EVRLE),
    BULKDATA: octets(EVRLE),
}


@pytest.mark.parametrize("resource", list(ResourceKind))
@pytest.mark.parametrize("header", [None, "", "  ", "*/*", "*/*; q=0.3", "text/html, */*;q=0.1"])
def test_missing_accept_and_wildcards_select_the_default(
    resource: ResourceKind, header: str | None
) -> None:
    assert negotiate(resource, header, []) == DEFAULTS[resource]


def test_type_wildcards() -> None:
    assert negotiate(INSTANCES, "multipart/*", []) == dicom(EVRLE)
    assert negotiate(FRAMES, "multipart/related", []) == octets(EVRLE)
    assert negotiate(FRAMES, 'multipart/related; type="application/*"', []) == octets(EVRLE)
    assert negotiate(METADATA, "application/*", []) == DICOM_JSON
    with pytest.raises(NotAcceptable):
        negotiate(METADATA, "multipart/*", [])


def test_multipart_property() -> None:
    assert dicom(EVRLE).multipart
    assert not DICOM_JSON.multipart


# -- the accept query parameter (§8.7.8, §8.3.3.1) -------------------------------------------


def test_query_parameter_overrides_the_header() -> None:
    chosen = negotiate(
        INSTANCES,
        "application/dicom+json",
        ['multipart/related; type="application/dicom"; transfer-syntax=*'],
    )

    assert chosen == dicom("*")


def test_query_parameter_repeated_and_comma_lists() -> None:
    params = ["image/png", "multipart/related; type=video/mp4, image/gif,"]
    params.append("multipart/related; type=application/octet-stream")

    assert negotiate(FRAMES, None, params) == octets(EVRLE)
    params.insert(1, f"multipart/related; type=image/jls; transfer-syntax={JPEG_LS}")
    assert negotiate(FRAMES, None, params).part_type == "image/jls"


def test_empty_query_parameter_leaves_the_header_in_force() -> None:
    assert negotiate(METADATA, "application/json", ["", " "]) == Negotiated(
        "application/json", "application/json", None
    )


# -- q-values and order ----------------------------------------------------------------------


def test_highest_q_wins() -> None:
    header = (
        f'multipart/related; type="application/dicom"; transfer-syntax={J2K}; q=0.5, '
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.9'
    )

    assert negotiate(INSTANCES, header, []) == dicom("*")


def test_equal_q_keeps_the_clients_order() -> None:
    header = (
        f'multipart/related; type="application/dicom"; transfer-syntax={J2K}, '
        'multipart/related; type="application/dicom"'
    )

    assert negotiate(INSTANCES, header, []) == dicom(J2K)


def test_unsupported_highest_q_falls_back_to_a_supported_one() -> None:
    header = "image/jpeg, multipart/related; type=application/octet-stream; q=0.2"

    assert negotiate(FRAMES, header, []) == octets(EVRLE)


def test_q_zero_is_not_acceptable_and_rules_out_the_wildcards_stand_in() -> None:
    assert negotiate(METADATA, "application/dicom+json; q=0, */*;q=0.5, application/json;q=0.1", [])
    assert negotiate(METADATA, "application/dicom+json; q=0, application/json", []) == Negotiated(
        "application/json", "application/json", None
    )
    with pytest.raises(NotAcceptable):
        negotiate(INSTANCES, '*/*, multipart/related; type="application/dicom"; q=0', [])


def test_q_zero_does_not_rule_out_anything_when_it_names_nothing_offered() -> None:
    assert negotiate(METADATA, "text/html;q=0, */*", []) == DICOM_JSON


# -- transfer syntax (§8.7.3.5.2) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
        ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    ],
)
@pytest.mark.parametrize("resource", [INSTANCES, FRAMES, BULKDATA])
def test_implicit_vr_and_big_endian_shall_not_be_used(
    resource: ResourceKind, uid: str, name: str
) -> None:
    part = "application/dicom" if resource is INSTANCES else "application/octet-stream"

    with pytest.raises(NotAcceptable, match=f"{uid} \\({name}.*shall not be used"):
        negotiate(resource, f"multipart/related; type={part}; transfer-syntax={uid}", [])


def test_forbidden_syntax_falls_back_to_a_lower_q_alternative() -> None:
    header = (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2, '
        'multipart/related; type="application/dicom"; q=0.5'
    )

    assert negotiate(INSTANCES, header, []) == dicom(EVRLE)


def test_explicit_syntaxes_are_carried_for_the_transcoder_to_decide() -> None:
    # Whether a stored instance can be sent in J2K is decided per instance.
    header = f'multipart/related; type="application/dicom"; transfer-syntax="{J2K}"'

    assert negotiate(INSTANCES, header, []) == dicom(J2K)
    header = f"multipart/related; type=application/dicom; transfer-syntax={EVRLE}"
    assert negotiate(INSTANCES, header, []) == dicom(EVRLE)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (f"transfer-syntax={JPEG_LS}; transfer-syntax=*", "*"),
        (f"transfer-syntax={JPEG_LS}; transfer-syntax={EVRLE}", EVRLE),
        (f"transfer-syntax={JPEG_LS}; transfer-syntax={J2K}", JPEG_LS),
        ("transfer-syntax=; transfer-syntax=*", "*"),
    ],
)
def test_repeated_transfer_syntax_reads_as_the_most_permissive(values: str, expected: str) -> None:
    header = f"multipart/related; type=application/octet-stream; {values}"

    assert negotiate(FRAMES, header, []).transfer_syntax == expected


@pytest.mark.parametrize("bad", ["jpeg", "1.2.840.10008.1.2.4.080", "1..2", "1.2." + "3" * 70])
def test_a_transfer_syntax_that_is_no_uid_is_not_acceptable(bad: str) -> None:
    with pytest.raises(NotAcceptable, match="not a UID"):
        negotiate(
            FRAMES, f"multipart/related; type=application/octet-stream; transfer-syntax={bad}", []
        )


# -- what is not offered ----------------------------------------------------------------------


def test_metadata_as_multipart_xml_is_not_acceptable() -> None:
    with pytest.raises(NotAcceptable, match="dicom\\+xml is not offered"):
        negotiate(METADATA, 'multipart/related; type="application/dicom+xml"', [])


def test_frames_as_other_images_or_video_are_not_acceptable() -> None:
    for header in ["image/png", "video/mp4", "image/*"]:
        with pytest.raises(NotAcceptable, match="is not offered"):
            negotiate(FRAMES, header, [], single=True)
    with pytest.raises(NotAcceptable, match="needs a single frame"):
        negotiate(FRAMES, "image/jpeg", [])


def test_instances_as_bulk_data_are_not_acceptable() -> None:
    with pytest.raises(NotAcceptable, match="part type application/octet-stream"):
        negotiate(INSTANCES, MULTIPART_OCTETS, [])


def test_not_acceptable_names_what_was_asked_and_what_is_offered() -> None:
    with pytest.raises(NotAcceptable) as caught:
        negotiate(FRAMES, "image/jpeg;q=0.9, text/html", [])

    message = caught.value.message
    assert "image/jpeg;q=0.9, text/html" in message
    assert MULTIPART_OCTETS in message
    assert EVRLE in message
    assert "frames" in message


def test_a_long_accept_is_shortened_in_the_message() -> None:
    with pytest.raises(NotAcceptable) as caught:
        negotiate(FRAMES, ", ".join(["text/html"] * 200), [])

    assert len(caught.value.message) < 800


# -- syntax (RFC 9110 §12.5.1, PS3.18 §8.7.1) -------------------------------------------------


def test_names_and_types_are_case_insensitive() -> None:
    header = 'Multipart/Related; TYPE="Application/DICOM"; Transfer-Syntax=*'

    assert negotiate(INSTANCES, header, []) == dicom("*")


def test_quoted_values_may_hold_separators() -> None:
    header = 'multipart/related; type="application/dicom"; x="a,b;c\\"d", application/json'

    assert negotiate(INSTANCES, header, []) == dicom(EVRLE)


def test_parameters_after_q_are_extensions() -> None:
    header = "multipart/related; type=application/dicom; q=0.8; transfer-syntax=1.2.840.10008.1.2"

    assert negotiate(INSTANCES, header, []) == dicom(EVRLE)


def test_whitespace_and_empty_items_are_tolerated() -> None:
    header = " ,  multipart/related ;type = application/octet-stream ; transfer-syntax = * ,"

    assert negotiate(FRAMES, header, []) == octets("*")


@pytest.mark.parametrize(
    "bad",
    ["dicom", "application/", "/json", "*/json", "a/b/c", "application/dicom+json; q=2", "*/*;q=x"],
)
@pytest.mark.parametrize("in_query", [False, True])
def test_malformed_media_ranges_are_invalid_requests(bad: str, in_query: bool) -> None:
    source = "accept query parameter" if in_query else "Accept header"

    with pytest.raises(InvalidRequest, match=source):
        if in_query:
            negotiate(METADATA, None, [bad])
        else:
            negotiate(METADATA, bad, [])
