"""`facegate evaluate`: the sweep arithmetic, and a run against a real server with a member
of its own that the evaluation must leave alone."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client.cli import main
from facegate_server import gate
from facegate_server.commands.evaluate import (
    MAX_CANDIDATES,
    NO_MATPLOTLIB,
    OTHER_MEMBER,
    QUALITY_RULE_OF_HINT,
    TURNSTILE,
    Claim,
    Person,
    Probe,
    claims,
    find_people,
    member_id,
    refusals,
    refusing_rule,
    report,
    split,
    tally,
    tally_verify,
    verify_accepts,
)
from facegate_server.domain import Decision
from facegate_server.engines.index import Match
from facegate_server.engines.policy import (
    HINT_AMBIGUOUS,
    DecisionPolicy,
    QualityProblem,
    decide_match,
    decide_verification,
)

from tests.conftest import Faces
from tests.helpers import running_server


def probe(person: str, genuine: bool, *candidates: tuple[str, float]) -> Probe:
    return Probe(Path("x.jpg"), person, genuine, "DENIED_UNKNOWN_FACE", "", list(candidates))


def test_tally_recomputes_decisions_at_each_threshold() -> None:
    probes = [
        probe("a", True, ("a", 0.30), ("b", 0.80)),  # clear
        probe("b", True, ("b", 0.50), ("a", 0.55)),  # within 0.05 of the runner-up
        probe("c", True, ("a", 0.45), ("c", 0.70)),  # closer to someone else
        probe("d", False, ("a", 0.58), (OTHER_MEMBER, 0.9)),  # a stranger
        probe("e", True),  # no face
    ]
    at = tally(probes, 0.55, 0.10)
    assert (at.genuine, at.correct, at.false_reject, at.wrong_member) == (4, 1, 2, 1)
    assert (at.impostors, at.impostor_grant) == (1, 0)
    no_margin = tally(probes, 0.60, 0.0)
    assert (no_margin.correct, no_margin.wrong_member, no_margin.impostor_grant) == (2, 1, 1)
    poor = Probe(Path("y.jpg"), "a", True, "DENIED_POOR_QUALITY", "", [("a", 0.2)])
    assert tally([poor], 0.6, 0.0).correct == 0  # no threshold grants a poor-quality face


def refused(
    person: str, genuine: bool, decision: str, hint: str, *candidates: tuple[str, float]
) -> Probe:
    return Probe(Path("x.jpg"), person, genuine, decision, "", list(candidates), "", hint)


def test_refusals_by_rule_against_the_threshold_alone() -> None:
    probes = [
        refused("a", True, "DENIED_POOR_QUALITY", "hold still", ("a", 0.40)),  # a cost
        refused("a", True, "DENIED_POOR_QUALITY", "hold still", ("a", 0.60)),
        refused("b", False, "DENIED_POOR_QUALITY", "hold still", ("a", 0.50)),  # kept out
        refused("a", True, "DENIED_POOR_QUALITY", "come closer", ("b", 0.50)),  # not a cost
        refused("a", True, "DENIED_AMBIGUOUS", HINT_AMBIGUOUS, ("a", 0.45), ("b", 0.50)),
        refused("a", True, "DENIED_MULTIPLE_FACES", "one person at a time, please"),
        refused("c", False, "DENIED_UNKNOWN_FACE", "", ("a", 0.70)),
        Probe(Path("x.jpg"), "a", True, "GRANTED", "a", [("a", 0.3)]),
    ]
    assert [refusing_rule(p) for p in probes] == [
        "sharpness",
        "sharpness",
        "sharpness",
        "size",
        "margin",
        "several faces",
        "threshold",
        "",
    ]
    by_rule = refusals(probes, 0.55)
    assert list(by_rule) == ["several faces", "size", "sharpness", "margin", "threshold"]
    s = by_rule["sharpness"]
    assert (s.genuine, s.genuine_threshold_grants, s.impostors, s.impostor_threshold_grants) == (
        2,
        1,
        1,
        1,
    )
    assert by_rule["size"].genuine_threshold_grants == 0  # the closest is someone else
    assert by_rule["margin"].genuine_threshold_grants == 1
    assert (by_rule["threshold"].impostors, by_rule["threshold"].impostor_threshold_grants) == (
        1,
        0,
    )
    out = io.StringIO()
    report(probes, 0.10, [0.55], out, 0.55)
    table = out.getvalue()
    assert "refusals by rule" in table
    assert [
        line.split() for line in table.splitlines() if line.strip().startswith("sharpness")
    ] == [["sharpness", "2", "1", "1", "1"]]


def claiming(
    person: str, genuine: bool, gallery: str, *candidates: tuple[str, float], decision: str = ""
) -> Probe:
    return Probe(
        Path("x.jpg"),
        person,
        genuine,
        decision or "DENIED_UNKNOWN_FACE",
        "",
        list(candidates),
        gallery=tuple(gallery),
    )


def test_each_probe_claims_its_own_member_and_every_other() -> None:
    probes = [
        claiming("a", True, "abc", ("a", 0.40), (OTHER_MEMBER, 0.45), ("b", 0.60), ("c", 0.70)),
        claiming("d", False, "ab", ("a", 0.50), ("b", 0.80)),  # a stranger
        claiming("a", True, "ab", ("a", 0.2), ("b", 0.9), decision="DENIED_POOR_QUALITY"),
        claiming("a", True, "ab", decision="DENIED_MULTIPLE_FACES"),  # no face compared
    ]
    assert claims(probes[0]) == [Claim(True, 0.40), Claim(False, 0.60), Claim(False, 0.70)]
    assert claims(probes[1]) == [Claim(False, 0.50), Claim(False, 0.80)]
    never = float("inf")  # Verify refuses these faces before comparing them
    assert claims(probes[2]) == claims(probes[3]) == [Claim(True, never), Claim(False, never)]
    at = tally_verify(probes, 0.55)
    assert (at.genuine, at.genuine_accepted, at.impostors, at.impostor_accepted) == (3, 1, 6, 1)
    assert at.not_measured == 0
    loose = tally_verify(probes, 0.65)
    assert (loose.genuine_accepted, loose.impostor_accepted) == (1, 2)


def test_a_claimed_member_beyond_the_candidates_is_not_measured() -> None:
    listed = [(f"m{i}", 0.30 + i / 100) for i in range(MAX_CANDIDATES)]  # m0 0.30 .. m9 0.39
    probe = claiming("z", True, ["m0", "z"], *listed)
    assert claims(probe) == [Claim(False, 0.30), Claim(True, 0.39, exact=False)]
    below = tally_verify([probe], 0.35)  # z is further than 0.39: rejected for certain
    assert (below.genuine_accepted, below.impostor_accepted, below.not_measured) == (0, 1, 0)
    above = tally_verify([probe], 0.55)  # z might be within: neither accepted nor rejected
    assert (above.genuine_accepted, above.not_measured) == (0, 1)
    short = claiming("z", True, ["m0", "z"], *listed[:3])  # every member listed: z had none
    assert claims(short)[1] == Claim(True, float("inf"))


def test_the_1_to_1_rule_is_verifys() -> None:
    assert MAX_CANDIDATES == gate.MAX_CANDIDATES
    for threshold in (0.5, 0.55, 0.6):
        policy = DecisionPolicy(verify_threshold=threshold)
        for distance in (0.3, 0.5, 0.55, 0.6, 0.65, float("inf")):
            engine = decide_verification("m-a", distance, policy).decision
            assert verify_accepts(distance, threshold) == (engine is Decision.GRANTED)


def test_the_1_to_1_table_marks_the_verify_threshold() -> None:
    probes = [
        claiming("a", True, "ab", ("a", 0.40), ("b", 0.60)),
        claiming("b", True, "ab", ("b", 0.52), ("a", 0.58)),
    ]
    out = io.StringIO()
    report(probes, 0.10, [0.50, 0.60], out, 0.55, verify_threshold=0.55)
    table = out.getvalue()
    assert "2 genuine claims" in table and "2 impostor claims" in table
    rows = table[table.index("1:1 (Verify)") :].splitlines()
    assert [line.split() for line in rows[1:] if line.strip()[:1].isdigit()] == [
        ["0.50", "1/2", "1/2", "0/2"],
        ["0.55*", "2/2", "0/2", "0/2"],
        ["0.60", "2/2", "0/2", "2/2"],
    ]
    without = io.StringIO()
    report(probes, 0.10, [0.55], without, 0.55)
    assert "1:1" not in without.getvalue()


def test_the_rules_hints_are_the_engines() -> None:
    assert set(QUALITY_RULE_OF_HINT) == {p.hint for p in QualityProblem}


def test_the_sweep_grants_exactly_what_the_local_engine_would() -> None:
    distances = [0.3, 0.45, 0.5, 0.55, 0.6, 0.65, float("inf")]
    for threshold, margin in itertools.product((0.5, 0.55, 0.6), (0.0, 0.05, 0.1)):
        policy = DecisionPolicy(match_threshold=threshold, match_margin=margin)
        for best, runner_up in itertools.product(distances[:-1], distances):
            if runner_up < best:
                continue
            engine = decide_match(Match("m-a", best, "m-b", runner_up), policy).decision
            swept = tally([probe("a", True, ("a", best), ("b", runner_up))], threshold, margin)
            assert (swept.correct == 1) == (engine is Decision.GRANTED), (best, runner_up)


def test_evaluate_loads_neither_numpy_nor_matplotlib() -> None:
    """`facegate` loads the command to list it: that must stay cheap, and work without the
    `evaluate` extra."""
    code = (
        "import sys, facegate_server.commands.evaluate;"
        "print(sorted({'numpy', 'matplotlib'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_without_matplotlib_evaluate_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "kim").mkdir()
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / "kim" / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed

    # Nothing listens on port 9: the check comes before any call to a server.
    code = main(["evaluate", str(tmp_path), "--target", "127.0.0.1:9"])

    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", NO_MATPLOTLIB + "\n")
    assert "pip install 'facegate-server[evaluate]'" in NO_MATPLOTLIB


def test_people_and_their_enrolment_photos(tmp_path: Path) -> None:
    for person, names in {"kim": ["10.jpg", "2.jpg", "1.png"], "lee": ["a.jpg"]}.items():
        (tmp_path / person).mkdir()
        for name in names:
            (tmp_path / person / name).write_bytes(b"")
    (tmp_path / "kim" / "notes.txt").write_text("not a photo")
    people = find_people(tmp_path)
    assert [(p.name, [f.name for f in p.photos]) for p in people] == [
        ("kim", ["1.png", "2.jpg", "10.jpg"]),
        ("lee", ["a.jpg"]),
    ]
    kim, lee = split(people, None)
    assert [f.name for f in kim.enrolled] == ["1.png"]
    assert [f.name for f in kim.probes] == ["2.jpg", "10.jpg"]
    assert lee.enrolled == [] and len(lee.probes) == 1
    assert [f.name for f in split(people, 5)[0].enrolled] == ["1.png", "2.jpg"]
    assert member_id("eval-1-", "José María") == "eval-1-Jos__Mar_a"
    assert Person("x", []).probes == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """conftest's server, with a recognition budget that a busy 2-core machine keeps."""
    data = tmp_path_factory.mktemp("facegate-data")
    with running_server(data, workers=2, identify_budget_ms=20_000) as built:
        yield built


def test_evaluate_a_running_server_and_leave_its_members_alone(
    stub: pb_grpc.FaceGateServiceStub,
    target: str,
    faces: Faces,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = stub.Enroll(
        pb.EnrollRequest(member_id="m-real", photos=[faces.read("people/joe_biden/1.jpg")]),
        timeout=60,
    ).member
    photos = tmp_path / "photos"
    for person in ("kit_harington", "rose_leslie", "lin_manuel_miranda"):
        (photos / person).mkdir(parents=True)
        for path in faces.of(person):
            (photos / person / Path(path).name).symlink_to(faces.root / path)
    plot = tmp_path / "trade-off.png"

    code = main(["evaluate", str(photos), "--target", target, "--plot", str(plot), "--verify"])

    out, err = capsys.readouterr()
    assert code == 0, err
    # kit: 1 enrolled, 2 probes; rose: 1 and 1; lin: impostor only. Then each enrolled
    # person is left out in turn: 3 + 2 more impostor probes.
    assert "9 probes: 3 genuine (the person is enrolled), 6 impostor (the person is not)" in out
    assert "as served    3/3       0/3       0/3       0/6" in out
    assert "     0.55    3/3       0/3       0/3       0/6" in out
    assert "3 genuine claims (a probe, its own member's id), 10 impostor claims" in out
    assert "    0.55*    3/3       0/3       0/10" in out
    assert "Verify's decisions: DENIED_NOT_THIS_MEMBER 6, GRANTED 3 (9/9 the same as" in out
    assert (
        "genuine claims accepted 3/3, impostor claims (the closest person the run enrolled)" in out
    )
    assert "enrolled 2 people under eval-" in err
    assert plot.read_bytes().startswith(b"\x89PNG")
    members = stub.ListMembers(pb.ListMembersRequest(), timeout=5).members
    assert [m.member_id for m in members] == ["m-real"]
    assert members[0] == real
    # SearchFaces logs nothing; --verify's calls are logged as verifications, one a probe.
    events = stub.ListAccessEvents(pb.ListAccessEventsRequest(), timeout=5).events
    assert {(e.kind, e.turnstile_id) for e in events} == {(pb.ACCESS_KIND_VERIFY, TURNSTILE)}
    assert len(events) == 9
