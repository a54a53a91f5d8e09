"""The RecognitionEngine contract, run against every engine: the local engine (dlib workers),
the Azure engine (through the SDK, against the Face API emulator) and the in-memory fake.

Each engine is driven the way the gate drives it: `enrol` makes the templates, the store
commits them, `enrolled` (and, for the cloud, the outbox replayer and a training) makes
the member recognisable; `removed` forgets them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import pytest
from facegate_server.domain import Decision, FaceTemplate
from facegate_server.engines.base import EngineFailure, RecognitionEngine
from facegate_server.errors import InvalidArgument
from facegate_server.store import MemoryStore

from tests.conftest import Faces
from tests.helpers import image_bytes

TIMEOUT = 60.0
"""Generous: the engines share two cores with the emulator; speed is the benchmark's."""


@dataclass
class Harness:
    engine: RecognitionEngine
    store: MemoryStore
    settle: Callable[[], None]
    cloud: bool = False
    validates_photos: bool = True
    """Whether `enrol` itself refuses a photo without a usable face (the cloud engine
    leaves that to the Face API, when the outbox replays the photo)."""

    def enrol(self, member_id: str, photos: list[bytes]) -> list[FaceTemplate]:
        templates = self.engine.enrol(photos, TIMEOUT, [FaceTemplate() for _ in photos])
        if self.cloud:  # the store keeps the local engine's part too, which the router adds
            templates = [replace(t, embedding=np.zeros(128)) for t in templates]
        self.store.create_member(member_id, member_id, templates, datetime.now(UTC))
        self.engine.enrolled(member_id, templates)
        self.settle()
        return templates

    def remove_photo(self, member_id: str, index: int) -> None:
        """RemoveMemberPhoto as the gate does it: the store, then the engine (the cloud's
        copy through the outbox)."""
        photo = self.store.photos(member_id)[index]
        _, removed = self.store.remove_photo(
            member_id, photo.photo_id, datetime.now(UTC), cloud=self.cloud
        )
        self.engine.template_removed(member_id, removed)
        self.settle()

    def remove(self, member_id: str) -> None:
        self.store.delete_member(member_id, cloud=self.cloud)
        self.engine.removed(member_id)
        self.settle()


def memory_harness(faces: Faces) -> Iterator[Harness]:
    from facegate_server.engines.memory import MemoryEngine

    people = {faces.read(r["path"]): r["person"] for r in faces.rows if r["faces"] == "1"}
    yield Harness(MemoryEngine(people.get), MemoryStore(), lambda: None)


def local_harness(faces: Faces) -> Iterator[Harness]:
    from facegate_server.engines.index import FaceIndex
    from facegate_server.engines.local import LocalEngine, WorkerPool

    pool = WorkerPool(1, max_bytes=6 * 1024 * 1024, max_side=4096)
    pool.warm_up()
    engine = LocalEngine(pool, FaceIndex())
    try:
        yield Harness(engine, MemoryStore(), lambda: None)
    finally:
        engine.close()


def azure_harness(faces: Faces) -> Iterator[Harness]:
    from facegate_server.cloud.azure import AzureFace, AzureSettings
    from facegate_server.cloud.engine import AzureEngine, CloudPeople
    from facegate_server.cloud.sync import CloudSync, Training

    from tests.cloud import KEY, emulator
    from tests.helpers import FakeClock

    store = MemoryStore()
    clock = FakeClock()
    with emulator() as running:
        face = AzureFace(AzureSettings(running.endpoint, KEY, group_id="contract"))
        people = CloudPeople(store)
        replayer = CloudSync(face, store, people, clock=clock)
        engine = AzureEngine(face, people)

        def settle() -> None:
            for _ in range(100):
                replayer.run_once()
                if store.outbox_depth() == 0 and replayer.training is Training.IDLE:
                    return
                clock.advance(1.0)
                running.settings.clock.advance(1.0)  # type: ignore[attr-defined]
            raise AssertionError("the cloud did not settle")

        yield Harness(engine, store, settle, cloud=True, validates_photos=False)


HARNESSES = {"memory": memory_harness, "local": local_harness, "azure": azure_harness}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest, faces: Faces) -> Iterator[Harness]:
    yield from HARNESSES[request.param](faces)


@pytest.fixture
def enrolled(harness: Harness, faces: Faces) -> Harness:
    """Obama and Biden enrolled (two photos, one photo)."""
    harness.enrol("m-obama", [faces.read(p) for p in faces.of("barack_obama")[:2]])
    harness.enrol("m-biden", [faces.read(faces.of("joe_biden")[0])])
    return harness


def test_it_says_what_it_is(harness: Harness) -> None:
    assert harness.engine.name
    assert harness.engine.kind.value in ("LOCAL", "AZURE")


def test_enrol_adds_its_part_to_every_template_in_order(harness: Harness, faces: Faces) -> None:
    photos = [faces.read(p) for p in faces.of("kit_harington")[:2]]
    given = [FaceTemplate(photo=b"kept-1"), FaceTemplate(photo=b"kept-2")]
    templates = harness.engine.enrol(photos, TIMEOUT, given)
    assert [t.photo for t in templates] == [b"kept-1", b"kept-2"]  # what it was given stays
    # and something of its own was added: an embedding, or the photo for the cloud
    assert all(t.embedding is not None or t.cloud_photo is not None for t in templates)


def test_an_enrolled_member_is_granted_on_another_photo(enrolled: Harness, faces: Faces) -> None:
    found = enrolled.engine.identify(faces.read(faces.of("barack_obama")[2]), TIMEOUT)
    assert (found.decision, found.member_id) == (Decision.GRANTED, "m-obama")
    assert found.engine is enrolled.engine.kind
    assert 0.5 <= found.confidence <= 1.0
    assert enrolled.engine.knows("m-obama")


def test_a_stranger_is_unknown(enrolled: Harness, faces: Faces) -> None:
    found = enrolled.engine.identify(faces.read(faces.of("kit_harington")[0]), TIMEOUT)
    assert (found.decision, found.member_id) == (Decision.DENIED_UNKNOWN_FACE, "")
    assert not enrolled.engine.knows("m-kit")


def test_a_frame_without_a_face_is_no_face(harness: Harness) -> None:
    found = harness.engine.identify(image_bytes(640, 480, "JPEG", "gray"), TIMEOUT)
    assert found.decision is Decision.DENIED_NO_FACE
    assert found.hint


def test_a_removed_member_is_never_granted_again(enrolled: Harness, faces: Faces) -> None:
    enrolled.remove("m-obama")
    found = enrolled.engine.identify(faces.read(faces.of("barack_obama")[2]), TIMEOUT)
    assert found.decision is not Decision.GRANTED
    assert found.member_id == ""
    assert not enrolled.engine.knows("m-obama")
    still = enrolled.engine.identify(faces.read(faces.of("joe_biden")[1]), TIMEOUT)
    assert (still.decision, still.member_id) == (Decision.GRANTED, "m-biden")


def test_search_puts_the_member_first(enrolled: Harness, faces: Faces) -> None:
    result = enrolled.engine.search(faces.read(faces.of("barack_obama")[3]), TIMEOUT, 2)
    assert result.identification.decision is Decision.GRANTED
    assert result.candidates and result.candidates[0].member_id == "m-obama"
    assert len(result.candidates) <= 2


def test_bytes_that_are_no_image_are_refused_not_crashed_on(harness: Harness) -> None:
    with pytest.raises((InvalidArgument, EngineFailure)) as refused:
        harness.engine.identify(b"\x89PNG not really" * 100, TIMEOUT)
    if isinstance(refused.value, EngineFailure):
        assert not refused.value.engine_fault  # the frame's fault, not the engine's


def test_a_photo_without_a_face_is_refused_at_enrolment_naming_it(
    harness: Harness, faces: Faces
) -> None:
    if not harness.validates_photos:
        pytest.skip("the cloud engine leaves photo checks to the Face API (outbox replay)")
    photos = [faces.read(faces.of("rose_leslie")[0]), image_bytes(640, 480, "JPEG", "gray")]
    with pytest.raises(InvalidArgument) as refused:
        harness.engine.enrol(photos, TIMEOUT, [FaceTemplate(), FaceTemplate()])
    assert refused.value.field == "photos[1]"


def test_a_removed_template_is_forgotten_and_the_others_still_match(
    enrolled: Harness, faces: Faces
) -> None:
    """A member enrolled with someone else's photo by mistake: removing it stops the
    wrong face matching them, and they are still recognised from the photos left."""
    obama, kit = faces.of("barack_obama"), faces.of("kit_harington")
    enrolled.enrol("m-mixed", [faces.read(kit[0]), faces.read(faces.of("rose_leslie")[0])])
    wrong = enrolled.engine.identify(faces.read(kit[1]), TIMEOUT)
    assert (wrong.decision, wrong.member_id) == (Decision.GRANTED, "m-mixed")
    enrolled.remove_photo("m-mixed", 0)
    gone = enrolled.engine.identify(faces.read(kit[1]), TIMEOUT)
    assert gone.member_id != "m-mixed" and gone.decision is not Decision.GRANTED
    kept = enrolled.engine.identify(faces.read(faces.of("rose_leslie")[1]), TIMEOUT)
    assert (kept.decision, kept.member_id) == (Decision.GRANTED, "m-mixed")
    assert enrolled.engine.knows("m-mixed")
    others = enrolled.engine.identify(faces.read(obama[2]), TIMEOUT)
    assert (others.decision, others.member_id) == (Decision.GRANTED, "m-obama")


# -- Verify (1:1): one member's photos only


def test_a_member_verifies_with_their_id(enrolled: Harness, faces: Faces) -> None:
    found = enrolled.engine.verify("m-obama", faces.read(faces.of("barack_obama")[2]), TIMEOUT)
    assert (found.decision, found.member_id) == (Decision.GRANTED, "m-obama")
    assert found.engine is enrolled.engine.kind
    assert 0.5 <= found.confidence <= 1.0


def test_a_member_is_not_somebody_else(enrolled: Harness, faces: Faces) -> None:
    """Biden is enrolled, but not as m-obama: the card decides whose photos count."""
    found = enrolled.engine.verify("m-obama", faces.read(faces.of("joe_biden")[1]), TIMEOUT)
    assert (found.decision, found.member_id) == (Decision.DENIED_NOT_THIS_MEMBER, "")
    assert found.confidence < 0.5


def test_a_stranger_with_a_members_id_is_denied(enrolled: Harness, faces: Faces) -> None:
    found = enrolled.engine.verify("m-biden", faces.read(faces.of("kit_harington")[0]), TIMEOUT)
    assert (found.decision, found.member_id) == (Decision.DENIED_NOT_THIS_MEMBER, "")


def test_an_unknown_id_is_denied_like_a_face_that_is_not_theirs(
    enrolled: Harness, faces: Faces
) -> None:
    obama = faces.read(faces.of("barack_obama")[2])
    found = enrolled.engine.verify("m-nobody", obama, TIMEOUT)
    assert (found.decision, found.member_id, found.confidence) == (
        Decision.DENIED_NOT_THIS_MEMBER,
        "",
        0.0,
    )
    assert found.face_box == enrolled.engine.verify("m-biden", obama, TIMEOUT).face_box


def test_verify_still_judges_the_frame(enrolled: Harness) -> None:
    """No face is no face, whoever is claimed (known or not)."""
    frame = image_bytes(640, 480, "JPEG", "gray")
    for member_id in ("m-obama", "m-nobody"):
        found = enrolled.engine.verify(member_id, frame, TIMEOUT)
        assert found.decision is Decision.DENIED_NO_FACE
        assert found.hint


def test_a_removed_member_never_verifies_again(enrolled: Harness, faces: Faces) -> None:
    enrolled.remove("m-obama")
    found = enrolled.engine.verify("m-obama", faces.read(faces.of("barack_obama")[2]), TIMEOUT)
    assert (found.decision, found.member_id) == (Decision.DENIED_NOT_THIS_MEMBER, "")
