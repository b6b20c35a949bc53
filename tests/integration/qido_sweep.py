"""Generated QIDO-RS queries for differential tests (gateway vs a reference QIDO server).

``Corpus`` holds what a reference server answers for the whole data set (every
study, series and instance with the attributes the generator draws from);
``generate_queries`` draws queries from those values with a seeded
``random.Random``, so the same data and seed give the same queries in the
same order on every run.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
PATIENT_ID = "00100020"

UNIQUE = {
    "patients": PATIENT_ID,
    "studies": STUDY_UID,
    "series": SERIES_UID,
    "instances": SOP_UID,
}

# Attribute keyword -> tag (as DICOM JSON spells it) for the keys drawn here.
TAGS = {
    "PatientID": "00100020",
    "PatientName": "00100010",
    "PatientSex": "00100040",
    "PatientBirthDate": "00100030",
    "StudyDate": "00080020",
    "StudyTime": "00080030",
    "AccessionNumber": "00080050",
    "ModalitiesInStudy": "00080061",
    "StudyDescription": "00081030",
    "StudyID": "00200010",
    "StudyInstanceUID": STUDY_UID,
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "SeriesNumber": "00200011",
    "SeriesInstanceUID": SERIES_UID,
    "SOPClassUID": "00080016",
    "SOPInstanceUID": SOP_UID,
    "InstanceNumber": "00200013",
}
KEYWORD_OF = {tag: kw for kw, tag in TAGS.items()}

PATIENT_KEYS = ("PatientID", "PatientName", "PatientSex", "PatientBirthDate")
STUDY_KEYS = (
    *PATIENT_KEYS,
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyDescription",
    "StudyID",
    "StudyInstanceUID",
)
SERIES_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber")

# includefield entries drawn per level (keywords and tags alike).
INCLUDE_FIELDS = {
    "patients": ("PatientBirthDate", "00100040", "NumberOfPatientRelatedStudies"),
    "studies": ("StudyDescription", "00081030", "00080090", "NumberOfStudyRelatedInstances", "all"),
    "series": ("SeriesDescription", "0008103E", "00080021", "NumberOfSeriesRelatedInstances"),
    "instances": ("00280010", "Rows", "NumberOfFrames", "00080008"),
}


@dataclass(frozen=True)
class Query:
    """One QIDO-RS search: a resource path under the DICOMweb root and its parameters."""

    path: str
    params: tuple[tuple[str, str], ...]

    @property
    def level(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def unique(self) -> str:
        """The tag (DICOM JSON spelling) that names each result."""
        return UNIQUE[self.level]

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name or TAGS.get(key) == name or KEYWORD_OF.get(key) == name:
                return value
        return None

    def match_params(self) -> list[tuple[str, str]]:
        """The attribute match parameters, with keywords (never tags) as names."""
        controls = {"includefield", "limit", "offset", "fuzzymatching"}
        return [(KEYWORD_OF.get(k, k), v) for k, v in self.params if k not in controls]

    @property
    def paged(self) -> bool:
        return self.param("limit") is not None or self.param("offset") is not None

    @property
    def fuzzy(self) -> bool:
        return self.param("fuzzymatching") == "true"

    def url(self, root: str) -> str:
        # '*', ',', '^', '?', '/' stay literal: Orthanc 1.10's plugin does not percent-decode
        # them (PatientName=Doe%2A matches nothing there); the gateway decodes
        # either form.
        if not self.params:
            return root + self.path
        return root + self.path + "?" + urlencode(self.params, safe="*,^?/")

    def without(self, *names: str) -> Query:
        return Query(self.path, tuple((k, v) for k, v in self.params if k not in names))

    def without_keyword(self, keyword: str) -> Query:
        return Query(
            self.path, tuple((k, v) for k, v in self.params if KEYWORD_OF.get(k, k) != keyword)
        )

    def replacing(self, name: str, value: str) -> Query:
        return Query(
            self.path,
            tuple((k, value) if KEYWORD_OF.get(k, k) == name else (k, v) for k, v in self.params),
        )

    def __str__(self) -> str:
        return self.url("")


def _value(obj: dict[str, Any], tag: str) -> Any:
    values = obj.get(tag, {}).get("Value")
    return values[0] if values else None


def _values(obj: dict[str, Any], tag: str) -> list[Any]:
    return list(obj.get(tag, {}).get("Value", []))


@dataclass
class Corpus:
    """Everything the reference holds, as its QIDO answers (DICOM JSON objects)."""

    studies: list[dict[str, Any]]
    series: list[dict[str, Any]]
    instances: list[dict[str, Any]]
    series_of: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    instances_of: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for se in self.series:
            self.series_of.setdefault(_value(se, STUDY_UID), []).append(se)
        for inst in self.instances:
            self.instances_of.setdefault(_value(inst, SERIES_UID), []).append(inst)

    def strings(self, objs: Iterable[dict[str, Any]], keyword: str) -> list[str]:
        """Distinct non-empty values of *keyword* (PN as its Alphabetic group), sorted."""
        out: set[str] = set()
        for obj in objs:
            for v in _values(obj, TAGS[keyword]):
                if isinstance(v, dict):
                    v = v.get("Alphabetic", "")
                if v not in ("", None):
                    out.add(str(v))
        return sorted(out)


# ---------------------------------------------------------------------------- values


def _wildcard(rng: random.Random, value: str, *, ascii_only: bool) -> str:
    """A pattern that *value* matches (mostly), or a near miss."""
    if ascii_only:
        value = _plain(value)
    form = rng.randrange(9)
    n = len(value)
    k = rng.randint(1, max(1, n - 1))
    if form == 0:
        return value
    if form == 1:
        return value[:k] + "*"
    if form == 2:
        return "*" + value[k:]
    if form == 3:
        j = rng.randint(k, n)
        return "*" + value[k - 1 : j] + "*"
    if form == 4:
        i = rng.randrange(n)
        return value[:i] + "?" + value[i + 1 :]
    if form == 5:
        return value[:k] + "*" + value[min(n, k + 2) :]
    if form == 6 and "^" in value and rng.random() < 0.5:
        # Name components on their own (PN matches per component group only).
        family, _, given = value.partition("^")
        return rng.choice(
            [family, f"{family}^", f"*^{given}", f"{family}^{given[:1]}*", f"{family}^*"]
        )
    if form == 6:
        # A case variant: literal for all but PN (PS3.4 C.2.2.2.1).
        return rng.choice([value.lower(), value.upper(), value.swapcase()])
    if form == 7:
        return value[:k] + "*x"
    return "*"


def _plain(value: str) -> str:
    """*value* with each non-ASCII character and space as ``?``: Orthanc 1.10's
    plugin percent-decodes neither UTF-8 nor spaces (``%20`` and ``+`` alike match
    nothing there), and ``?`` must then stand for one character, not one byte."""
    return "".join(c if c.isascii() and c != " " else "?" for c in value)


def _date_key(rng: random.Random, dates: list[str]) -> str:
    a, b = sorted(rng.sample(dates, 2)) if len(dates) > 1 else (dates[0], dates[0])
    form = rng.randrange(6)
    if form == 0:
        return a
    if form == 1:
        return f"{a}-{b}"
    if form == 2:
        return f"-{b}"
    if form == 3:
        return f"{a}-"
    if form == 4:
        # An interval ending the day before a stored date.
        day_before = datetime.strptime(b, "%Y%m%d") - timedelta(days=1)
        return f"19000101-{day_before:%Y%m%d}"
    return f"{b}-{b}"


def _time_key(rng: random.Random, times: list[str]) -> str:
    def cut(t: str) -> str:
        return t[: rng.choice([2, 4, 6])] if "." not in t or rng.random() < 0.5 else t

    a, b = sorted(rng.sample(times, 2))
    form = rng.randrange(8)
    fractional = [t for t in times if "." in t]
    if form >= 5 and fractional:
        # Stored times with fractions (133834.250000) against keys of other
        # precisions: the same time written shorter, longer, as a range end.
        t = rng.choice(fractional)
        whole, fraction = t.split(".")
        forms = [
            t,
            f"{whole}.{fraction.rstrip('0')}",
            whole,
            whole[:4],
            f"-{whole}",
            f"{whole}-",
            f"{whole[:4]}-{whole[:4]}",
            f"-{t}",
            f"{t}-{t}",
        ]
        return rng.choice(forms)
    if form == 0:
        return cut(a)
    if form == 1:
        return f"{cut(a)}-{cut(b)}"
    if form == 2:
        return f"-{cut(b)}"
    if form == 3:
        return f"{cut(a)}-"
    return f"{a[:4]}-{b[:4]}"


def _uid_list(rng: random.Random, uids: list[str]) -> str:
    picked = rng.sample(uids, min(len(uids), rng.randint(1, 3)))
    if rng.random() < 0.2:
        picked.append("1.2.3.4.5.6.7.8.9")  # no such object
    return ",".join(picked)


KeyDraw = Callable[[random.Random, "Corpus", list[dict[str, Any]]], str]


def _text_draw(keyword: str, *, wildcards: bool = True) -> KeyDraw:
    def draw(rng: random.Random, corpus: Corpus, objs: list[dict[str, Any]]) -> str:
        values = corpus.strings(objs, keyword)
        value = rng.choice(values)
        if not wildcards or rng.random() < 0.3:
            return _plain(value)
        return _wildcard(rng, value, ascii_only=True)

    return draw


def _code_list(keyword: str) -> KeyDraw:
    def draw(rng: random.Random, corpus: Corpus, objs: list[dict[str, Any]]) -> str:
        values = [*corpus.strings(objs, keyword), "SR", "PT"]
        form = rng.randrange(4)
        if form == 0:
            return ",".join(rng.sample(values, 2))
        if form == 1:
            return rng.choice(values)[0] + "*"
        return rng.choice(values)

    return draw


def _number_draw(keyword: str) -> KeyDraw:
    def draw(rng: random.Random, corpus: Corpus, objs: list[dict[str, Any]]) -> str:
        value = rng.choice(corpus.strings(objs, keyword))
        # The same number written otherwise (IS is a decimal string, PS3.5 6.2).
        return rng.choice([value, value, value, f"0{value}", f"+{value}", str(int(value) + 1)])

    return draw


def _uid_draw(keyword: str) -> KeyDraw:
    def draw(rng: random.Random, corpus: Corpus, objs: list[dict[str, Any]]) -> str:
        return _uid_list(rng, corpus.strings(objs, keyword))

    return draw


def _dates(keyword: str) -> KeyDraw:
    def draw(rng: random.Random, corpus: Corpus, objs: list[dict[str, Any]]) -> str:
        return _date_key(rng, corpus.strings(objs, keyword))

    return draw


def _times(keyword: str) -> KeyDraw:
    def draw(rng: random.Random, corpus: Corpus, objs: list[dict[str, Any]]) -> str:
        return _time_key(rng, corpus.strings(objs, keyword))

    return draw


DRAWS: dict[str, KeyDraw] = {
    "PatientID": _text_draw("PatientID"),
    "PatientName": _text_draw("PatientName"),
    "PatientSex": _code_list("PatientSex"),
    "PatientBirthDate": _dates("PatientBirthDate"),
    "StudyDate": _dates("StudyDate"),
    "StudyTime": _times("StudyTime"),
    "AccessionNumber": _text_draw("AccessionNumber"),
    "ModalitiesInStudy": _code_list("ModalitiesInStudy"),
    "StudyDescription": _text_draw("StudyDescription"),
    "StudyID": _text_draw("StudyID", wildcards=False),
    "StudyInstanceUID": _uid_draw("StudyInstanceUID"),
    "Modality": _code_list("Modality"),
    "SeriesDescription": _text_draw("SeriesDescription"),
    "SeriesNumber": _number_draw("SeriesNumber"),
    "SeriesInstanceUID": _uid_draw("SeriesInstanceUID"),
    "SOPClassUID": _uid_draw("SOPClassUID"),
    "SOPInstanceUID": _uid_draw("SOPInstanceUID"),
    "InstanceNumber": _number_draw("InstanceNumber"),
}


# ---------------------------------------------------------------------------- queries


def _draw_params(
    rng: random.Random,
    corpus: Corpus,
    level: str,
    keys: tuple[str, ...],
    objs: list[dict[str, Any]],
    *,
    max_keys: int = 3,
) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    usable = [k for k in keys if corpus.strings(objs, k)]
    # Mostly one or two keys: three random keys rarely leave a match.
    count = min(max_keys, len(usable), rng.choice([0, 1, 1, 1, 2, 2, 3]))
    for keyword in rng.sample(usable, count):
        name = TAGS[keyword] if rng.random() < 0.2 else keyword
        params.append((name, DRAWS[keyword](rng, corpus, objs)))
    if rng.random() < 0.25:
        fields = rng.sample(INCLUDE_FIELDS[level], rng.randint(1, 2))
        if "all" in fields:
            fields = ["all"]
        params.append(("includefield", ",".join(fields)))
    if rng.random() < 0.1 and any(k == "PatientName" for k, _ in params):
        params.append(("fuzzymatching", rng.choice(["true", "false"])))
    elif rng.random() < 0.05:
        params.append(("fuzzymatching", "false"))
    if rng.random() < 0.12:
        params.append(("limit", str(rng.randint(1, 4))))
        if rng.random() < 0.6:
            params.append(("offset", str(rng.randint(0, 5))))
    return params


def generate_queries(corpus: Corpus, seed: int, per_resource: int) -> list[Query]:
    """*per_resource* queries for each QIDO resource (and ``/patients``), deterministic
    for a given corpus and seed."""
    rng = random.Random(seed)
    out: list[Query] = []
    all_series = corpus.series
    all_instances = corpus.instances
    for _ in range(per_resource):
        out.append(
            Query(
                "/patients",
                tuple(_draw_params(rng, corpus, "patients", PATIENT_KEYS, corpus.studies)),
            )
        )
    for _ in range(per_resource):
        out.append(
            Query(
                "/studies", tuple(_draw_params(rng, corpus, "studies", STUDY_KEYS, corpus.studies))
            )
        )
    for _ in range(per_resource):
        # Relational: study keys narrow which studies' series are listed.
        params = _draw_params(rng, corpus, "series", SERIES_KEYS, all_series, max_keys=2)
        params += _draw_params(rng, corpus, "studies", STUDY_KEYS, corpus.studies, max_keys=1)[:1]
        out.append(Query("/series", tuple(_dedupe(params))))
    for _ in range(per_resource):
        params = _draw_params(rng, corpus, "instances", INSTANCE_KEYS, all_instances, max_keys=2)
        params += _draw_params(rng, corpus, "series", SERIES_KEYS, all_series, max_keys=1)[:1]
        params += _draw_params(rng, corpus, "studies", STUDY_KEYS, corpus.studies, max_keys=1)[:1]
        out.append(Query("/instances", tuple(_dedupe(params))))
    for _ in range(per_resource):
        study = rng.choice(corpus.studies)
        uid = _value(study, STUDY_UID)
        series = corpus.series_of.get(uid, [])
        params = _draw_params(rng, corpus, "series", SERIES_KEYS, series)
        out.append(Query(f"/studies/{uid}/series", tuple(params)))
    for _ in range(per_resource):
        se = rng.choice(all_series)
        st, uid = _value(se, STUDY_UID), _value(se, SERIES_UID)
        insts = corpus.instances_of.get(uid, [])
        params = _draw_params(rng, corpus, "instances", INSTANCE_KEYS, insts)
        out.append(Query(f"/studies/{st}/series/{uid}/instances", tuple(params)))
    for _ in range(per_resource):
        study = rng.choice(corpus.studies)
        uid = _value(study, STUDY_UID)
        series = corpus.series_of.get(uid, [])
        insts = [i for se in series for i in corpus.instances_of.get(_value(se, SERIES_UID), [])]
        params = _draw_params(rng, corpus, "instances", INSTANCE_KEYS, insts, max_keys=2)
        params += _draw_params(rng, corpus, "series", SERIES_KEYS, series, max_keys=1)[:1]
        out.append(Query(f"/studies/{uid}/instances", tuple(_dedupe(params))))
    return out


def _dedupe(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One parameter per attribute and one of each control (a repeat is a 400)."""
    seen: set[str] = set()
    out = []
    for name, value in params:
        canon = KEYWORD_OF.get(name, name)
        if canon in seen:
            continue
        seen.add(canon)
        out.append((name, value))
    return out


_SPLIT = re.compile(r"[,\\]")


# ---------------------------------------------------------------------------- reference

# Keys whose values Orthanc matches without regard to case (its plugin and its
# C-FIND alike) where PS3.4 C.2.2.2.1 and .4 make matching case-sensitive: every
# VR but PN.
CASE_SENSITIVE_KEYS = frozenset(
    {
        "PatientID",
        "PatientSex",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyDescription",
        "StudyID",
        "Modality",
        "SeriesDescription",
    }
)
CODE_KEYS = frozenset({"PatientSex", "ModalitiesInStudy", "Modality"})
_CONTROLS = ("includefield", "limit", "offset", "fuzzymatching")

Fetch = Callable[[Query], list[dict[str, Any]]]


def glob(pattern: str, text: str, *, ignore_case: bool = False) -> bool:
    """PS3.4 C.2.2.2.4 wild card matching (``*`` any run, ``?`` one character)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.fullmatch(regex, text, flags) is not None


def _texts(obj: dict[str, Any], keyword: str) -> list[str] | None:
    attr = obj.get(TAGS[keyword])
    if attr is None:
        return None
    return [str(v) for v in attr.get("Value", [])]


def _key_matches(obj: dict[str, Any], keyword: str, key: str, *, ignore_case: bool) -> bool:
    texts = _texts(obj, keyword)
    if texts is None:
        return True  # not in the answer: the reference's word is taken
    codes = _SPLIT.split(key) if keyword in CODE_KEYS else [key]
    if not texts:
        return all(c.strip("*") == "" for c in codes)
    return any(glob(c, t, ignore_case=ignore_case) for c in codes for t in texts)


def _time_span(text: str) -> tuple[int, int] | None:
    """First and last microsecond of the day a TM value (HH[MM[SS[.F]]]) denotes."""
    found = re.fullmatch(r"(\d\d)(\d\d)?(\d\d)?(?:\.(\d{1,6}))?", text.strip())
    if found is None:
        return None
    hh, mm, ss, frac = found.groups()
    first = (int(hh) * 3600 + int(mm or 0) * 60 + int(ss or 0)) * 10**6
    first += int((frac or "").ljust(6, "0") or 0)
    width = 10 ** (6 - len(frac)) if frac else 10**6 if ss else 60 * 10**6 if mm else 3600 * 10**6
    return first, first + width - 1


def _time_matches(key: str, stored: list[str] | None) -> bool:
    low, dash, high = key.partition("-")
    if not dash:
        high = low
    lo = _time_span(low) if low else (0, 0)
    hi = _time_span(high) if high else (0, 24 * 3600 * 10**6)
    assert lo is not None and hi is not None, key
    spans = [_time_span(t) for t in stored or []]
    return any(span is not None and lo[0] <= span[0] <= hi[1] for span in spans)


def _name_matches(key: str, obj: dict[str, Any]) -> bool:
    """PN: without regard to case, against the whole name or any one group."""
    for name in _values(obj, TAGS["PatientName"]):
        groups = [name.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
        whole = "=".join(groups).rstrip("=")
        if any(glob(key, text, ignore_case=True) for text in [whole, *groups] if text):
            return True
    return False


@dataclass
class Expected:
    """What the gateway must answer to a query, judged from the reference's answers."""

    uids: set[str]
    # The gateway may find more (fuzzy matching the reference does not do).
    superset: bool = False
    # A page (limit/offset, 0 = none): a page of ``uids`` in an order of the PACS's own.
    page: tuple[int, int] | None = None
    # Documented differences from the reference applied to reach ``uids``.
    notes: list[str] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Results no answer is wrong about (left out on both sides).
    ignore: set[str] = field(default_factory=set)

    def check(self, query: Query, ours: list[str]) -> str | None:
        """None when *ours* (the UIDs the gateway returned) is right, else why not."""
        ours = [uid for uid in ours if uid not in self.ignore]
        self.uids -= self.ignore
        got = set(ours)
        problems = []
        page_size = None
        if self.page is not None:
            limit, offset = self.page
            page_size = max(0, min(limit or len(self.uids), len(self.uids) - offset))
        if len(got) != len(ours):
            problems.append("duplicate results")
        if page_size is not None:
            if len(ours) != page_size or not got <= self.uids:
                problems.append(f"a page of {page_size} of the reference's results")
        elif self.superset:
            if not got >= self.uids:
                problems.append("at least the reference's results")
        elif got != self.uids:
            problems.append("the reference's results")
        if not problems:
            return None
        return (
            f"{query}: expected {', '.join(problems)}\n"
            f"  only gateway:   {sorted(got - self.uids)}\n"
            f"  only reference: {sorted(self.uids - got)}\n"
            f"  both: {len(got & self.uids)}; documented differences applied: {self.notes}"
        )


def expected_answer(query: Query, fetch: Fetch) -> Expected:
    """The gateway's answer to *query* as the reference (Orthanc's plugin) gives it,
    corrected by the documented differences, each with its reason in ``notes``."""
    notes: list[str] = []
    base = query.without("limit", "offset")
    unique = query.unique
    if query.level == "patients":
        # Orthanc's plugin has no /patients: the patients are those of the studies
        # matching the same patient keys.
        base = Query("/studies", tuple(base.without("includefield").params))
        notes.append("patients: PatientIDs of the reference's /studies answer")
        unique = STUDY_UID
    in_studies: set[str] | None = None
    modalities = base.param("ModalitiesInStudy")
    if (
        modalities is not None
        and base.level in ("series", "instances")
        and not base.path.startswith("/studies/")
    ):
        # Orthanc's relational /series and /instances match nothing for a
        # ModalitiesInStudy key (it keeps that attribute for studies only);
        # PS3.18 §10.6.3.3 makes it a study key there: the series (instances)
        # of the studies its /studies finds for the key.
        notes.append("ModalitiesInStudy: Orthanc's /series and /instances match nothing")
        in_studies = set()
        for code in _SPLIT.split(modalities):
            found = fetch(Query("/studies", (("ModalitiesInStudy", code),)))
            in_studies |= {_value(obj, STUDY_UID) for obj in found}
        base = Query(
            base.path,
            tuple((k, v) for k, v in base.params if KEYWORD_OF.get(k, k) != "ModalitiesInStudy"),
        )
    time_key = base.param("StudyTime")
    if time_key is not None:
        # Orthanc's plugin compares times as strings: -1630 misses 163000, and
        # 133834 misses 133834.250000 (PS3.4 C.2.2.2.5 compares times of day; a
        # value stands for the whole span of its precision).
        notes.append("StudyTime: Orthanc compares strings; matched here as times")
        base = base.without_keyword("StudyTime")
    widened: set[str] = set()
    for keyword, value in base.match_params():
        if "?" in value and (keyword in CASE_SENSITIVE_KEYS or keyword == "PatientName"):
            # Orthanc takes '?' for one byte, not one character (M?ller misses
            # Müller in UTF-8): asked with '*', matched here.
            notes.append(f"{keyword}: Orthanc's '?' is one byte; asked with '*'")
            widened.add(keyword)
            base = base.replacing(keyword, value.replace("?", "*"))
    name_key = query.param("PatientName")
    if name_key is not None and (
        "PatientName" in widened or ("=" not in name_key and not name_key.endswith("*"))
    ):
        # Orthanc's plugin matches a name key against the whole value, all
        # component groups included: Yamada^Tarou misses
        # Yamada^Tarou=山田^太郎=やまだ^たろう. Each group is a name of its own.
        notes.append("PatientName: Orthanc matches the whole value; matched here by group")
        sent = base.param("PatientName") or ""
        if not sent.endswith("*"):
            base = base.replacing("PatientName", sent + "*")
    else:
        name_key = None
    variants = [base]
    for keyword, value in base.match_params():
        if keyword in CODE_KEYS and _SPLIT.search(value):
            notes.append(f"{keyword}: Orthanc ignores a list of codes; union of each code")
            variants = [
                v.replacing(keyword, code) for v in variants for code in _SPLIT.split(value)
            ]
    objects: dict[str, dict[str, Any]] = {}
    for variant in variants:
        for obj in fetch(variant):
            objects[_value(obj, unique)] = obj
    if time_key is not None:
        objects = {
            u: o for u, o in objects.items() if _time_matches(time_key, _texts(o, "StudyTime"))
        }
    if name_key is not None:
        objects = {u: o for u, o in objects.items() if _name_matches(name_key, o)}
    if in_studies is not None:
        objects = {u: o for u, o in objects.items() if _value(o, STUDY_UID) in in_studies}
    for keyword, value in query.match_params():
        if keyword not in CASE_SENSITIVE_KEYS:
            continue
        dropped = {
            uid: obj
            for uid, obj in objects.items()
            if not _key_matches(obj, keyword, value, ignore_case=False)
        }
        for uid, obj in dropped.items():
            assert keyword in widened or _key_matches(obj, keyword, value, ignore_case=True), (
                f"{query}: the reference returned {uid} whose {keyword} "
                f"{_texts(obj, keyword)} does not match {value!r} even without case"
            )
            del objects[uid]
        if dropped:
            notes.append(f"{keyword}: Orthanc ignores case ({len(dropped)} dropped)")
    if query.level == "patients":
        objects = {_value(o, PATIENT_ID): o for o in objects.values()}
    expected = Expected(set(objects), notes=notes, objects=objects)
    if query.fuzzy:
        expected.superset = True
        notes.append("fuzzymatching: Orthanc matches literally")
    if query.paged:
        expected.page = (int(query.param("limit") or 0), int(query.param("offset") or 0))
        notes.append("paged: the PACS's order is not the plugin's")
    return expected


# Attributes Orthanc's plugin computes or adds that a C-FIND answer does not carry
# (RetrieveURL, RetrieveAETitle, InstanceAvailability, SpecificCharacterSet; see
# test_search_orthanc.py).
PLUGIN_ONLY = frozenset({"00081190", "00080054", "00080056", "00080005"})


def normalized(attr: dict[str, Any]) -> list[Any]:
    """Values as a client reads them: strings stripped, numbers as numbers."""
    out: list[Any] = []
    for v in attr.get("Value", []):
        if isinstance(v, str):
            v = v.strip()
            if attr.get("vr") in ("IS", "DS"):
                with contextlib.suppress(ValueError):
                    v = float(v)
        elif isinstance(v, int | float):
            v = float(v)
        out.append(v)
    return out


def value_differences(
    ours: dict[str, Any], theirs: dict[str, Any], *, upper_levels: frozenset[str]
) -> list[str]:
    """How the gateway's object differs from the reference's (same UID).

    *upper_levels*: tags Orthanc adds from the levels above that PS3.18 does not
    ask for at this resource (see test_search_orthanc.py)."""
    out = []
    for tag, attr in sorted(ours.items()):
        if tag in PLUGIN_ONLY or tag not in theirs:
            continue
        ref = theirs[tag]
        if attr.get("vr") != ref.get("vr"):
            out.append(f"{tag}: VR {attr.get('vr')} vs {ref.get('vr')}")
        elif normalized(attr) != normalized(ref):
            out.append(f"{tag}: {normalized(attr)} vs {normalized(ref)}")
    missing = set(theirs) - set(ours) - PLUGIN_ONLY - upper_levels
    if missing:
        out.append(f"only the reference returns {sorted(missing)}")
    return out
