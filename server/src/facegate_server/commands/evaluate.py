"""`facegate evaluate DIR`: measure a running server's accept/reject trade-off on labelled photos.

DIR holds one folder of photos per person. Through the API (so whatever the server is
configured with is what is measured), it:

1. enrols, for each person with at least two photos, their first photos (half of them,
   at least one; `--enrol N` to choose), each person as a new member under a unique id
   prefix (`eval-<random>-`), so it never touches members it did not create;
2. probes with every other photo of the enrolled people (genuine probes), against the
   whole gallery (the gallery includes the server's own members, if it has any);
3. probes with people left out of the gallery (impostor probes): each enrolled person
   in turn is deleted, their photos are probed, and they are enrolled again; people with
   a single photo are only ever impostors;
4. deletes every member it created, even when interrupted.

Each probe is a SearchFaces call (admin only; nothing is written to the access log): the
server's own decision under its configured policy, and the closest members with their
distances, from which the decision is recomputed over a range of thresholds (at a fixed
margin) to show the trade-off: correct grants, false rejects, wrong-member grants and
impostor grants. With `--identify` every probe is also sent to Identify (logged under
turnstile `facegate-evaluate`), to measure the configured routing end to end.

The same distances give the 1:1 (Verify) figures: each probe is a genuine claim (its own
member's id, when they are enrolled) and an impostor claim of every other person the run
has enrolled, accepted at a threshold when the claimed member's distance is within it
(Verify has no margin). SearchFaces lists at most MAX_CANDIDATES members: a claimed member
it leaves out is further than the last one listed, which is all that is known of them, so
such a claim is "not measured" at thresholds from that distance on. With `--verify` every
probe is also sent to Verify (logged under the same turnstile): genuine probes claim their
own id, impostor probes the closest member the run enrolled.

The decisions are recomputed with the local engine's own grant rule (engines/grant.py).
The plot (PNG, `--plot`) needs matplotlib, which comes with the `evaluate` extra
(`pip install 'facegate-server[evaluate]'`), not with a gym's server install; it is
imported only to plot, and checked for before the run starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import os
import re
import secrets
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from facegate.v1 import facegate_service_pb2 as pb
from facegate_client import FaceGateClient
from facegate_client.errors import FaceGateError, NotFound

from facegate_server.engines.grant import Verdict, verdict  # the rule, without numpy

MAX_CANDIDATES = 10
"""SearchFaces' most candidates (gate.MAX_CANDIDATES; not imported: the gate needs numpy)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
TURNSTILE = "facegate-evaluate"
OTHER_MEMBER = "(a member not created by this run)"
NO_MATPLOTLIB = (
    "error: facegate evaluate plots with matplotlib, which is not installed: "
    "pip install 'facegate-server[evaluate]'"
)


@dataclass(frozen=True)
class Person:
    name: str
    photos: list[Path]
    enrolled: list[Path] = field(default_factory=list)

    @property
    def probes(self) -> list[Path]:
        return [p for p in self.photos if p not in self.enrolled]


@dataclass(frozen=True)
class Probe:
    """One probe photo's result: who it shows, and what the server said about it."""

    path: Path
    person: str
    genuine: bool
    """The person was in the gallery when probed."""
    decision: str
    """The server's decision (SearchFaces, its configured policy), e.g. GRANTED."""
    granted_to: str
    """The person (or OTHER_MEMBER) the server would grant; "" unless granted."""
    candidates: list[tuple[str, float]]
    """(person or OTHER_MEMBER, distance), closest first."""
    identify: str = ""
    """With --identify: Identify's decision and the person granted, e.g. GRANTED kim."""
    hint: str = ""
    """The server's hint (for DENIED_POOR_QUALITY, which quality limit the face failed)."""
    gallery: tuple[str, ...] = ()
    """The people this run had enrolled when the probe was made: the 1:1 claims."""
    verify: str = ""
    """With --verify: Verify's decision and the person claimed, e.g. GRANTED kim."""


@dataclass
class Tally:
    genuine: int = 0
    correct: int = 0
    false_reject: int = 0
    wrong_member: int = 0
    impostors: int = 0
    impostor_grant: int = 0

    def rate(self, count: int, total: int) -> float:
        return count / total if total else 0.0


def tally(probes: Sequence[Probe], threshold: float, margin: float) -> Tally:
    """Recompute every probe's decision at `threshold` and `margin` (distances), with the
    local engine's grant rule."""
    t = Tally()
    for probe in probes:
        granted = ""
        if probe.candidates and probe.decision not in _FACE_NOT_DECIDED_ON:
            best, distance = probe.candidates[0]
            runner_up = probe.candidates[1][1] if len(probe.candidates) > 1 else float("inf")
            if verdict(distance, runner_up, threshold, margin) is Verdict.GRANT:
                granted = best
        if probe.genuine:
            t.genuine += 1
            if granted == probe.person:
                t.correct += 1
            elif granted:
                t.wrong_member += 1
            else:
                t.false_reject += 1
        else:
            t.impostors += 1
            t.impostor_grant += bool(granted)
    return t


_FACE_NOT_DECIDED_ON = ("DENIED_NO_FACE", "DENIED_MULTIPLE_FACES", "DENIED_POOR_QUALITY")
"""Decisions no threshold changes: the face is not matched at all."""


def tally_decisions(probes: Sequence[Probe]) -> Tally:
    """The server's own decisions (its configured policy), counted like `tally`."""
    t = Tally()
    for probe in probes:
        if probe.genuine:
            t.genuine += 1
            if probe.granted_to == probe.person:
                t.correct += 1
            elif probe.granted_to:
                t.wrong_member += 1
            else:
                t.false_reject += 1
        else:
            t.impostors += 1
            t.impostor_grant += bool(probe.granted_to)
    return t


RULES = ("no face", "several faces", "size", "pose", "light", "sharpness", "margin", "threshold")
"""The rules that refuse a face, in the order the local engine applies them."""

_RULE_OF_DECISION = {
    "DENIED_NO_FACE": "no face",
    "DENIED_MULTIPLE_FACES": "several faces",
    "DENIED_AMBIGUOUS": "margin",
    "DENIED_UNKNOWN_FACE": "threshold",
}
QUALITY_RULE_OF_HINT = {
    "come closer": "size",
    "look at the camera": "pose",
    "step into the light": "light",
    "hold still": "sharpness",
}
"""policy.QualityProblem's hints (not imported: policy needs numpy; a test keeps them equal)."""


def refusing_rule(probe: Probe) -> str:
    """The rule that refused the probe ("" when it was granted; "other" if not known)."""
    if probe.decision == "GRANTED":
        return ""
    if probe.decision == "DENIED_POOR_QUALITY":
        return QUALITY_RULE_OF_HINT.get(probe.hint, "other")
    return _RULE_OF_DECISION.get(probe.decision, "other")


@dataclass
class Refusals:
    """What one rule refused, and what the threshold alone would have done instead."""

    genuine: int = 0
    genuine_threshold_grants: int = 0
    """Genuine probes it refused that the threshold alone grants to the right person: the
    rule's cost (unknown for "several faces" and "no face": no face was searched)."""
    impostors: int = 0
    impostor_threshold_grants: int = 0
    """Impostor probes it refused that the threshold alone lets in: what it protected."""


def refusals(probes: Sequence[Probe], threshold: float) -> dict[str, Refusals]:
    """Refusals by rule of the server's decisions, each against the threshold alone (the
    closest member granted within `threshold`, no other rule: the raw matcher)."""
    by_rule: dict[str, Refusals] = {}
    for probe in probes:
        rule = refusing_rule(probe)
        if not rule:
            continue
        r = by_rule.setdefault(rule, Refusals())
        best = probe.candidates[0] if probe.candidates else None
        within = best is not None and best[1] <= threshold
        if probe.genuine:
            r.genuine += 1
            r.genuine_threshold_grants += within and best is not None and best[0] == probe.person
        else:
            r.impostors += 1
            r.impostor_threshold_grants += within
    return {rule: by_rule[rule] for rule in (*RULES, "other") if rule in by_rule}


@dataclass(frozen=True)
class Claim:
    """One 1:1 claim: a probe and a member's id, as a card or QR code would claim it."""

    genuine: bool
    """The probe shows the claimed member."""
    distance: float
    """The claimed member's distance (infinity: no face to compare, never accepted)."""
    exact: bool = True
    """False: the member was not among the candidates, `distance` is only a lower bound."""


def claims(probe: Probe) -> list[Claim]:
    """Every claim a probe makes: its own person's (when enrolled), every other's."""
    return [claim_of(probe, person) for person in probe.gallery]


def claim_of(probe: Probe, person: str) -> Claim:
    """The probe's claim to be `person` (one of its gallery)."""
    decided = bool(probe.candidates) and probe.decision not in _FACE_NOT_DECIDED_ON
    listed = {who: d for who, d in reversed(probe.candidates) if who != OTHER_MEMBER}
    beyond = probe.candidates[-1][1] if len(probe.candidates) >= MAX_CANDIDATES else None
    genuine = person == probe.person
    if not decided:
        return Claim(genuine, float("inf"))
    if person in listed:
        return Claim(genuine, listed[person])
    if beyond is not None:
        return Claim(genuine, beyond, exact=False)
    return Claim(genuine, float("inf"))  # every member was listed: none of theirs compared


def verify_accepts(distance: float, threshold: float) -> bool:
    """Verify's rule (policy.decide_verification): the claimed member within the threshold."""
    return distance <= threshold


@dataclass
class VerifyTally:
    genuine: int = 0
    genuine_accepted: int = 0
    impostors: int = 0
    impostor_accepted: int = 0
    not_measured: int = 0
    """Claims of members beyond the candidates, whose distance may be within the threshold."""


def tally_verify(probes: Sequence[Probe], threshold: float) -> VerifyTally:
    """Every probe's 1:1 claims decided at `threshold`."""
    t = VerifyTally()
    for claim in (c for p in probes for c in claims(p)):
        unknown = not claim.exact and claim.distance <= threshold
        accepted = not unknown and verify_accepts(claim.distance, threshold)
        t.not_measured += unknown
        if claim.genuine:
            t.genuine += 1
            t.genuine_accepted += accepted
        else:
            t.impostors += 1
            t.impostor_accepted += accepted
    return t


def find_people(root: Path) -> list[Person]:
    people = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)],
        )
        if photos:
            people.append(Person(folder.name, photos))
    return people


def split(people: Sequence[Person], enrol: int | None) -> list[Person]:
    """Choose each person's enrolment photos (none for people with a single photo)."""
    chosen = []
    for person in people:
        n = len(person.photos)
        count = 0 if n < 2 else min(n - 1, enrol if enrol else max(1, n // 2))
        chosen.append(Person(person.name, person.photos, person.photos[:count]))
    return chosen


def member_id(prefix: str, person: str) -> str:
    return (prefix + re.sub(r"[^A-Za-z0-9._:@-]", "_", person))[:64]


class Run:
    """One evaluation against one server: the members it made, and its probes."""

    def __init__(
        self,
        client: FaceGateClient,
        prefix: str,
        identify: bool,
        err: TextIO,
        verify: bool = False,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.identify = identify
        self.verify = verify
        self.err = err
        self.created: dict[str, str] = {}  # member id -> person
        self.persons: dict[str, str] = {}  # every member id this run ever used -> person

    def enrol(self, person: Person) -> bool:
        mid = member_id(self.prefix, person.name)
        try:
            self.client.enroll(
                mid, [p.read_bytes() for p in person.enrolled], person.name, timeout=120
            )
        except FaceGateError as error:
            print(f"  not enrolled: {person.name}: {error.message}", file=self.err)
            return False
        self.created[mid] = person.name
        self.persons[mid] = person.name
        return True

    def remove(self, mid: str) -> None:
        with suppress(NotFound):
            self.client.delete_member(mid)
        self.created.pop(mid, None)

    def clean_up(self) -> None:
        for mid in list(self.created):
            self.remove(mid)

    def _who(self, mid: str) -> str:
        return self.persons.get(mid, OTHER_MEMBER) if mid.startswith(self.prefix) else OTHER_MEMBER

    def probe(self, path: Path, person: str, genuine: bool) -> Probe:
        image = path.read_bytes()
        gallery = tuple(sorted(self.created.values()))
        found = self.client.search_faces(image, MAX_CANDIDATES, timeout=60)
        decision = pb.Decision.Name(found.decision).removeprefix("DECISION_")
        candidates = [(self._who(c.member_id), c.distance) for c in found.candidates]
        granted_to = candidates[0][0] if decision == "GRANTED" and candidates else ""
        identified = ""
        if self.identify:
            answer = self.client.identify(image, TURNSTILE, timeout=60)
            identified = pb.Decision.Name(answer.decision).removeprefix("DECISION_")
            if answer.member_id:
                identified += " " + self._who(answer.member_id)
        verified = ""
        if self.verify:
            claimed = self._claim(person if genuine else "", candidates, gallery)
            if claimed:
                mid = member_id(self.prefix, claimed)
                said = self.client.verify(mid, image, TURNSTILE, timeout=60)
                verified = pb.Decision.Name(said.decision).removeprefix("DECISION_")
                verified += " " + claimed
        return Probe(
            path,
            person,
            genuine,
            decision,
            granted_to,
            candidates,
            identified,
            found.hint,
            gallery,
            verified,
        )

    @staticmethod
    def _claim(own: str, candidates: Sequence[tuple[str, float]], gallery: Sequence[str]) -> str:
        """Whom --verify claims: the person's own id, else the closest enrolled by the run."""
        if own:
            return own
        closest = [who for who, _ in candidates if who in gallery]
        return closest[0] if closest else (gallery[0] if gallery else "")

    def probe_all(self, jobs: Sequence[tuple[Path, str, bool]], parallel: int) -> list[Probe]:
        with cf.ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(lambda job: self.probe(*job), jobs))


@contextmanager
def cleaning_up(run: Run) -> Iterator[Run]:
    try:
        yield run
    finally:
        run.clean_up()


def evaluate(
    client: FaceGateClient,
    people: Sequence[Person],
    *,
    identify: bool = False,
    verify: bool = False,
    parallel: int = 2,
    err: TextIO | None = None,
) -> list[Probe]:
    """Enrol, probe (genuine, then each person left out in turn), clean up; the probes."""
    err = err or sys.stderr
    run = Run(client, f"eval-{secrets.token_hex(4)}-", identify, err, verify)
    probes: list[Probe] = []
    with cleaning_up(run):
        enrolled = [p for p in people if p.enrolled and run.enrol(p)]
        print(f"enrolled {len(enrolled)} people under {run.prefix}*", file=err)
        genuine = [(path, p.name, True) for p in enrolled for path in p.probes]
        outsiders = [
            (path, p.name, False) for p in people if p not in enrolled for path in p.photos
        ]
        probes += run.probe_all(genuine + outsiders, parallel)
        for person in enrolled:  # each enrolled person in turn, left out of the gallery
            mid = member_id(run.prefix, person.name)
            run.remove(mid)
            left_out = [(path, person.name, False) for path in person.photos]
            probes += run.probe_all(left_out, parallel)
            if not run.enrol(person):
                raise RuntimeError(f"could not enrol {person.name} again")
        print(f"probed {len(probes)} photos; deleting the evaluation's members", file=err)
    return probes


# ---------------------------------------------------------------- reporting

HEADER = (
    f"{'threshold':>9} {'correct':>9} {'false':>9} {'wrong':>9} {'impostor':>9}\n"
    f"{'':>9} {'grants':>9} {'rejects':>9} {'member':>9} {'grants':>9}"
)


def _row(label: str, t: Tally) -> str:
    return (
        f"{label:>9} {t.correct:>4}/{t.genuine:<4} {t.false_reject:>4}/{t.genuine:<4}"
        f" {t.wrong_member:>4}/{t.genuine:<4} {t.impostor_grant:>4}/{t.impostors:<4}"
    )


def thresholds(low: float, high: float, step: float) -> list[float]:
    count = round((high - low) / step)
    return [round(low + i * step, 4) for i in range(count + 1)]


def report(
    probes: Sequence[Probe],
    margin: float,
    shown: Sequence[float],
    out: TextIO,
    threshold: float = 0.55,
    verify_threshold: float | None = None,
) -> None:
    decisions = Counter(p.decision for p in probes)
    genuine = sum(p.genuine for p in probes)
    print(
        f"{len(probes)} probes: {genuine} genuine (the person is enrolled), "
        f"{len(probes) - genuine} impostor (the person is not)",
        file=out,
    )
    print(
        "the server's decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items())),
        file=out,
    )
    print(HEADER, file=out)
    print(_row("as served", tally_decisions(probes)), file=out)
    refused = refusals(probes, threshold)
    if refused:
        print(
            f"\nrefusals by rule (the threshold alone: the closest member within {threshold:.2f};"
            " - where no face was searched):",
            file=out,
        )
        print(
            f"{'rule':>14} {'genuine':>8} {'of which the':>13} {'impostors':>10} {'of which':>9}",
            file=out,
        )
        print(f"{'':>14} {'refused':>8} {'threshold':>13} {'refused':>10} {'it kept':>9}", file=out)
        print(f"{'':>14} {'':>8} {'grants':>13} {'':>10} {'out':>9}", file=out)
        for rule, r in refused.items():
            searched = rule not in ("no face", "several faces")
            cost = f"{r.genuine_threshold_grants}" if searched else "-"
            kept = f"{r.impostor_threshold_grants}" if searched else "-"
            print(f"{rule:>14} {r.genuine:>8} {cost:>13} {r.impostors:>10} {kept:>9}", file=out)
    if any(p.identify for p in probes):
        identified = Counter(p.identify.split()[0] for p in probes)
        agree = sum(p.identify == f"{p.decision} {p.granted_to}".strip() for p in probes)
        print(
            "Identify's decisions: "
            + ", ".join(f"{k} {v}" for k, v in sorted(identified.items()))
            + f" ({agree}/{len(probes)} the same as SearchFaces)",
            file=out,
        )
    print(f"\nrecomputed from the distances, margin {margin:.2f}:", file=out)
    print(HEADER, file=out)
    for t in shown:
        print(_row(f"{t:.2f}", tally(probes, t, margin)), file=out)
    same = sorted(p.candidates[0][1] for p in probes if p.genuine and p.candidates)
    others = sorted(
        d for p in probes for who, d in p.candidates if who != p.person and who != OTHER_MEMBER
    )
    if same:
        print(f"\nsame-person distances (best match): {same[0]:.3f} to {same[-1]:.3f}", file=out)
    if others:
        print(f"different-person distances: from {others[0]:.3f}", file=out)
    margins = sorted(
        p.candidates[1][1] - p.candidates[0][1]
        for p in probes
        if p.genuine and len(p.candidates) > 1 and p.candidates[0][0] == p.person
    )
    if margins:
        print(f"genuine probes' margin over the runner-up: from {margins[0]:.3f}", file=out)
    if verify_threshold is not None:
        report_verify(probes, sorted({*shown, verify_threshold}), verify_threshold, out)


VERIFY_HEADER = (
    f"{'threshold':>9} {'genuine':>9} {'genuine':>9} {'impostor':>9}\n"
    f"{'':>9} {'accepted':>9} {'rejected':>9} {'accepted':>9}"
)


def report_verify(
    probes: Sequence[Probe], shown: Sequence[float], verify_threshold: float, out: TextIO
) -> None:
    """The 1:1 table: genuine and impostor claims accepted at each threshold."""
    made = [c for p in probes for c in claims(p)]
    genuine = sum(c.genuine for c in made)
    print(
        f"\n1:1 (Verify): {genuine} genuine claims (a probe, its own member's id), "
        f"{len(made) - genuine} impostor claims (a probe, another enrolled person's id);\n"
        f"recomputed from the distances, * FACEGATE_VERIFY_THRESHOLD {verify_threshold:.2f}:",
        file=out,
    )
    print(VERIFY_HEADER, file=out)
    for threshold in shown:
        t = tally_verify(probes, threshold)
        mark = "*" if threshold == verify_threshold else " "
        row = (
            f"{threshold:>8.2f}{mark} {t.genuine_accepted:>4}/{t.genuine:<4}"
            f" {t.genuine - t.genuine_accepted:>4}/{t.genuine:<4}"
            f" {t.impostor_accepted:>4}/{t.impostors:<4}"
        )
        if t.not_measured:
            row += f" ({t.not_measured} not measured: beyond the {MAX_CANDIDATES} candidates)"
        print(row, file=out)
    if any(p.verify for p in probes):
        said = [p for p in probes if p.verify]
        own = [p for p in said if p.genuine]
        other = [p for p in said if not p.genuine]
        accepted_own = sum(p.verify.startswith("GRANTED ") for p in own)
        accepted_other = sum(p.verify.startswith("GRANTED ") for p in other)
        decisions = Counter(p.verify.split()[0] for p in said)
        agree = 0
        for p in said:
            decision, claimed = p.verify.split(maxsplit=1)
            claim = claim_of(p, claimed)
            agree += claim.exact and (decision == "GRANTED") == verify_accepts(
                claim.distance, verify_threshold
            )
        print(
            "Verify's decisions: "
            + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items()))
            + f" ({agree}/{len(said)} the same as recomputed at {verify_threshold:.2f});"
            f"\ngenuine claims accepted {accepted_own}/{len(own)}, impostor claims (the"
            f" closest person the run enrolled) accepted {accepted_other}/{len(other)}",
            file=out,
        )


def can_plot() -> bool:
    """Whether matplotlib is installed (found, not imported: that is plot's to do)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(
    probes: Sequence[Probe], margin: float, sweep: Sequence[float], marked: float, path: Path
) -> None:
    import matplotlib  # the `evaluate` extra; run_evaluate checked it is there

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tallies = [tally(probes, t, margin) for t in sweep]
    no_margin = [tally(probes, t, 0.0) for t in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    curves = {
        "correct grants": ([t.rate(t.correct, t.genuine) for t in tallies], "-"),
        "false rejects": ([t.rate(t.false_reject, t.genuine) for t in tallies], "--"),
        "wrong-member grants": ([t.rate(t.wrong_member, t.genuine) for t in tallies], "-."),
        "impostor grants": ([t.rate(t.impostor_grant, t.impostors) for t in tallies], ":"),
    }
    for name, (values, style) in curves.items():
        left.plot(sweep, values, style, label=name, linewidth=2)
    left.axvline(marked, color="grey", linewidth=1)
    left.annotate(f"default {marked:.2f}", (marked, 0.5), rotation=90, ha="right", fontsize=8)
    left.set_xlabel("threshold (descriptor distance)")
    left.set_ylabel("share of genuine / impostor probes")
    left.set_title(f"Outcomes by threshold (margin {margin:.2f})")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for label, series in ((f"margin {margin:.2f}", tallies), ("no margin", no_margin)):
        right.plot(
            [t.rate(t.impostor_grant, t.impostors) for t in series],
            [t.rate(t.false_reject + t.wrong_member, t.genuine) for t in series],
            marker=".",
            label=label,
        )
    right.set_xlabel("impostor grant rate")
    right.set_ylabel("genuine probes not granted to themselves")
    right.set_title("Trade-off (each point a threshold)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    genuine = sum(p.genuine for p in probes)
    fig.suptitle(
        f"facegate evaluate: {genuine} genuine, {len(probes) - genuine} impostor probes",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the command


def register_evaluate(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "evaluate",
        help="measure a running server's grants and rejections on labelled photos",
        description=(
            "Enrol part of each person's photos (DIR/<person>/*.jpg) on a running server, "
            "probe with the rest and with people left out of the gallery, report correct "
            "grants, false rejects, wrong-member grants and impostor grants over a range "
            "of thresholds (and, 1:1, the genuine and impostor claims Verify would "
            "accept), and plot the trade-off. Uses SearchFaces (admin role). Creates "
            "members under a unique 'eval-' prefix and deletes them, and only them."
        ),
    )
    parser.add_argument("dir", type=Path, help="one folder of photos per person")
    parser.add_argument(
        "--target",
        default=os.environ.get("FACEGATE_TARGET", "127.0.0.1:50051"),
        help="HOST:PORT ($FACEGATE_TARGET; default 127.0.0.1:50051)",
    )
    parser.add_argument("--enrol", type=int, help="photos to enrol a person (default: half)")
    parser.add_argument(
        "--margin",
        type=float,
        help="margin for the recomputed sweep (default: FACEGATE_MATCH_MARGIN's default)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("evaluate.png"),
        help="PNG to write (evaluate.png; needs matplotlib: facegate-server[evaluate])",
    )
    parser.add_argument(
        "--identify",
        action="store_true",
        help=f"also send every probe to Identify (logged as turnstile {TURNSTILE})",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also send every probe to Verify, claiming its own member's id (impostors: the "
        f"closest member the run enrolled; logged as turnstile {TURNSTILE})",
    )
    parser.add_argument("--parallel", type=int, default=2, help="calls in flight (2)")
    parser.add_argument(
        "--ca",
        metavar="PEM",
        default=os.environ.get("FACEGATE_CA") or None,
        help="TLS: the CA of the server's certificate ($FACEGATE_CA); the bearer token "
        "comes from $FACEGATE_TOKEN",
    )
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    people = split(find_people(args.dir), args.enrol)
    if not any(p.enrolled for p in people):
        print(f"error: no person in {args.dir} has two photos or more", file=sys.stderr)
        return 2
    if not can_plot():  # before the run, not after minutes of probing
        print(NO_MATPLOTLIB, file=sys.stderr)
        return 1
    options: dict[str, Any] = {"timeout": 60.0}
    token = os.environ.get("FACEGATE_TOKEN")
    if token:
        options["metadata"] = [("authorization", f"Bearer {token}")]
    if args.ca:
        import grpc

        options["credentials"] = grpc.ssl_channel_credentials(Path(args.ca).read_bytes())
    try:
        with FaceGateClient(args.target, **options) as client:
            probes = evaluate(
                client,
                people,
                identify=args.identify,
                verify=args.verify,
                parallel=args.parallel,
            )
    except FaceGateError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:  # an unreadable photo; a member not re-enrolled
        print(f"error: {error}", file=sys.stderr)
        return 1
    from facegate_server.config import Settings  # the policy's defaults; pydantic, not for --help

    defaults = Settings()
    margin = defaults.match_margin if args.margin is None else args.margin
    shown = sorted({*thresholds(0.40, 0.70, 0.05), defaults.match_threshold})
    report(probes, margin, shown, sys.stdout, defaults.match_threshold, defaults.verify_threshold)
    plot(probes, margin, thresholds(0.30, 0.80, 0.01), defaults.match_threshold, args.plot)
    print(f"\nplot: {args.plot}")
    return 0
