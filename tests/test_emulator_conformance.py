"""The emulator against the Face v1.0 contract itself (../shared/reference/azure-face-v1.0):

1. every answer a client relies on is validated against the swagger's schema for that
   operation (its `$ref`s resolved, `allOf` merged, no properties beyond the schema's,
   enums marked `modelAsString` left open as AutoRest reads them);
2. the requests of the swagger's examples (examples/*.json) are replayed, with real photos
   for their images and the emulator's own ids for the ids it creates, and the status must
   be one the example lists.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from facegate_azure_emulator import EmulatorSettings, ManualClock, RunningEmulator, start_emulator

from tests.conftest import Faces

REFERENCE = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "azure-face-v1.0"
)
KEY = "conformance-key"
FACE = "/face/v1.0"
OCTETS = {"Content-Type": "application/octet-stream"}


# ---- the contract as JSON Schema ----------------------------------------------------------


class Contract:
    """Face.json: its operations by operationId, their parameters and response schemas."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.swagger = json.loads((root / "Face.json").read_text())
        self.common = json.loads((root / "Common" / "Parameters.json").read_text())
        self.operations: dict[str, tuple[str, str, dict[str, Any]]] = {}
        self.examples: dict[str, str] = {}
        """example file name -> operationId"""
        paths = self.swagger["paths"] | self.swagger["x-ms-paths"]
        for path, item in paths.items():
            for method, operation in item.items():
                op_id = operation["operationId"]
                self.operations[op_id] = (method.upper(), path.split("?")[0], operation)
                for ref in operation.get("x-ms-examples", {}).values():
                    self.examples[Path(ref["$ref"]).name] = op_id
        self.checker = jsonschema.FormatChecker()

        @self.checker.checks("date-time", raises=ValueError)
        def is_datetime(value: object) -> bool:
            return not isinstance(value, str) or bool(datetime.fromisoformat(value))

    def resolve(self, node: Any) -> Any:
        """A copy with every local $ref inlined and allOf merged into the object."""
        if isinstance(node, list):
            return [self.resolve(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = node["$ref"]
            document = self.common if ref.startswith("../") else self.swagger
            target: Any = document
            for part in ref.split("#/")[1].split("/"):
                target = target[part]
            merged = {k: v for k, v in node.items() if k != "$ref"} | copy.deepcopy(target)
            return self.resolve(merged)
        out = {k: self.resolve(v) for k, v in node.items() if not k.startswith("x-")}
        if node.get("x-ms-enum", {}).get("modelAsString"):
            # AutoRest's open enum: other values are allowed (the SDK adds recognition_03/04).
            out.pop("enum", None)
        for part in out.pop("allOf", []):
            out.setdefault("properties", {}).update(part.get("properties", {}))
            out["required"] = sorted(set(out.get("required", [])) | set(part.get("required", [])))
            out.setdefault("type", part.get("type", "object"))
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
        return out

    def schema(self, op_id: str, status: int) -> dict[str, Any] | None:
        """The response schema the contract gives `op_id` for `status` (default: errors)."""
        responses = self.operations[op_id][2]["responses"]
        response = responses.get(str(status)) or responses["default"]
        raw = response.get("schema")
        return None if raw is None else self.resolve(raw)  # type: ignore[no-any-return]

    def statuses(self, op_id: str) -> set[str]:
        return set(self.operations[op_id][2]["responses"])

    def parameters(self, op_id: str) -> dict[str, dict[str, Any]]:
        return {
            p["name"]: p for p in (self.resolve(p) for p in self.operations[op_id][2]["parameters"])
        }

    def check(self, op_id: str, response: requests.Response) -> Any:
        """Validate `response` against the contract for `op_id`; return its JSON (or None)."""
        status = response.status_code
        if 200 <= status < 300:
            assert str(status) in self.statuses(op_id), (op_id, status, self.statuses(op_id))
        else:
            # Errors: the contract's APIError, with a code and a message every time.
            body = response.json()
            assert isinstance(body["error"]["code"], str) and body["error"]["message"], body
        schema = self.schema(op_id, status)
        if schema is None:
            assert response.content == b"", (op_id, response.content)
            return None
        body = response.json()
        jsonschema.Draft4Validator(schema, format_checker=self.checker).validate(body)
        return body


@pytest.fixture(scope="module")
def contract() -> Contract:
    if not (REFERENCE / "Face.json").exists():
        pytest.skip(f"the Face API reference is not here ({REFERENCE})")
    return Contract(REFERENCE)


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    settings = EmulatorSettings(
        key=KEY, training_seconds=0, clock=ManualClock(), workers=0, rate_per_second=0
    )
    with start_emulator(settings) as running:
        yield running


class Api:
    def __init__(self, emulator: RunningEmulator, contract: Contract) -> None:
        self.base = emulator.endpoint + FACE
        self.contract = contract
        self.session = requests.Session()
        self.session.headers["Ocp-Apim-Subscription-Key"] = KEY

    def __call__(self, op_id: str, path: str, *, expect: int = 200, **kwargs: Any) -> Any:
        method = self.contract.operations[op_id][0]
        response = self.session.request(method, self.base + path, timeout=10, **kwargs)
        assert response.status_code == expect, (op_id, response.status_code, response.text)
        return self.contract.check(op_id, response)


@pytest.fixture(scope="module")
def api(emulator: RunningEmulator, contract: Contract) -> Iterator[Api]:
    api = Api(emulator, contract)
    yield api
    api.session.close()


# ---- 1. answers validate against the schema ------------------------------------------------


@pytest.mark.parametrize("kind", ["persongroups", "largepersongroups"])
def test_answers_match_the_contract(api: Api, faces: Faces, kind: str) -> None:
    p = "PersonGroup" if kind == "persongroups" else "LargePersonGroup"
    ref = "personGroupId" if kind == "persongroups" else "largePersonGroupId"
    group = f"/{kind}/conformance"
    api(
        f"{p}_Create",
        group,
        json={"name": "c", "userData": "u", "recognitionModel": "recognition_04"},
    )
    api(f"{p}_Get", group, params={"returnRecognitionModel": "true"})
    assert api(f"{p}_Get", group) == {ref: "conformance", "name": "c", "userData": "u"}
    assert len(api(f"{p}_List", f"/{kind}", params={"returnRecognitionModel": "true"})) == 1
    person = api(f"{p}Person_Create", f"{group}/persons", json={"name": "obama", "userData": "m-1"})
    person_path = f"{group}/persons/{person['personId']}"
    face = api(
        f"{p}Person_AddFaceFromStream",
        f"{person_path}/persistedfaces",
        params={"userData": "front", "detectionModel": "detection_03"},
        data=faces.read("people/barack_obama/1.jpg"),
        headers=OCTETS,
    )
    assert api(
        f"{p}Person_GetFace", f"{person_path}/persistedfaces/{face['persistedFaceId']}"
    ) == face | {"userData": "front"}
    assert api(f"{p}Person_Get", person_path)["persistedFaceIds"] == [face["persistedFaceId"]]
    assert len(api(f"{p}Person_List", f"{group}/persons", params={"top": 10})) == 1
    api(f"{p}_Train", f"{group}/train", expect=202)
    assert api(f"{p}_GetTrainingStatus", f"{group}/training")["status"] == "succeeded"
    detected = api(
        "Face_DetectWithStream",
        "/detect",
        params={
            "recognitionModel": "recognition_04",
            "returnRecognitionModel": "true",
            "returnFaceLandmarks": "false",
        },
        data=faces.read("group/obama_and_biden.jpg"),
        headers=OCTETS,
    )
    face_ids = [f["faceId"] for f in detected]
    results = api(
        "Face_Identify",
        "/identify",
        json={
            "faceIds": face_ids,
            ref: "conformance",
            "maxNumOfCandidatesReturned": 5,
            "confidenceThreshold": 0,
        },
    )
    assert [r["faceId"] for r in results] == face_ids
    api("Face_VerifyFaceToFace", "/verify", json={"faceId1": face_ids[0], "faceId2": face_ids[1]})
    api(
        "Face_VerifyFaceToPerson",
        "/verify",
        json={"faceId": face_ids[0], "personId": person["personId"], ref: "conformance"},
    )
    api(f"{p}Person_DeleteFace", f"{person_path}/persistedfaces/{face['persistedFaceId']}")
    api(f"{p}Person_Delete", person_path)
    api(f"{p}_Delete", group)


def test_error_answers_match_the_contract(api: Api) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    api("PersonGroup_Get", "/persongroups/missing", expect=404)
    api("LargePersonGroupPerson_Get", f"/largepersongroups/missing/persons/{missing}", expect=404)
    api("Face_Identify", "/identify", json={"faceIds": []}, expect=400)
    api("Face_DetectWithStream", "/detect", data=b"x" * 2000, headers=OCTETS, expect=400)
    api("PersonGroup_Create", "/persongroups/Not-Valid", json={"name": "x"}, expect=400)


# ---- 2. the swagger's examples are accepted --------------------------------------------------

IMAGES = {"AddPersonGroupPersonFaceFromStream.json": "people/barack_obama/1.jpg"}
"""The photo to send where an example's image is only a placeholder."""

DEVIATIONS = {
    "CreateNewPersonGroup.json": (
        400,
        "its recognitionModel 'recognition_v01' names no model (the service has "
        "recognition_01 to _04) and the service refuses it: 'recognitionModel' is invalid.",
    ),
    "GetPersonGroupPersistedFace.json": (
        404,
        "its personId 'foobar' is not a uuid (the contract's format): PersonNotFound",
    ),
}
"""Examples whose literal request breaks Face.json itself: the documented error is checked,
then the request is replayed again with valid values."""


class Replay:
    """Replays examples/*.json in an order that builds what the next one needs."""

    def __init__(self, api: Api, contract: Contract, faces: Faces) -> None:
        self.api = api
        self.contract = contract
        self.faces = faces
        self.ids: dict[str, str] = {}
        self.replayed: list[str] = []

    def __call__(self, name: str, expect: int | None = None, **overrides: Any) -> Any:
        example = json.loads((self.contract.root / "examples" / name).read_text())
        op_id = self.contract.examples[name]
        method, template, _ = self.contract.operations[op_id]
        declared = self.contract.parameters(op_id)
        values = example["parameters"] | overrides
        path, query, kwargs = template, {}, {}
        for pname, value in values.items():
            where = declared.get(pname, {}).get("in", "header")
            if where == "path" and pname != "Endpoint":
                path = path.replace("{" + pname + "}", str(value))
            elif where == "query":
                if isinstance(value, list):
                    value = ",".join(str(v) for v in value)
                query[pname] = str(value).lower() if isinstance(value, bool) else value
            elif where == "body" and declared[pname].get("schema", {}).get("format") == "file":
                kwargs["data"] = self.faces.read(IMAGES.get(name, "people/barack_obama/1.jpg"))
                kwargs["headers"] = OCTETS
            elif where == "body":
                kwargs["json"] = value
        expected = {int(s) for s in example["responses"]}
        response = self.api.session.request(
            method, self.api.base + path, params=query, timeout=10, **kwargs
        )
        if expect is None:
            assert response.status_code in expected, (name, response.status_code, response.text)
        else:
            assert response.status_code == expect, (name, response.status_code, response.text)
        self.replayed.append(name)
        return self.contract.check(op_id, response)


@pytest.fixture(scope="module")
def replay(api: Api, contract: Contract, faces: Faces) -> Replay:
    return Replay(api, contract, faces)


def test_the_swagger_examples_are_accepted(
    replay: Replay, api: Api, contract: Contract, faces: Faces
) -> None:
    replay("CreateNewPersonGroup.json", expect=DEVIATIONS["CreateNewPersonGroup.json"][0])
    replay(
        "CreateNewPersonGroup.json",
        body={"name": "group1", "userData": "u", "recognitionModel": "recognition_01"},
    )
    replay("CreateNewLargePersonGroup.json")
    replay("GetPersonGroup.json")
    replay("ListPersonGroups.json")
    pg_person = replay("CreateNewPersonGroupPerson.json")["personId"]
    lpg_person = replay("CreateNewLargePersonGroupPerson.json")["personId"]
    replay("GetPersonGroupPerson.json", personId=pg_person)
    replay("UpdatePersonGroupPerson.json", personId=pg_person)
    replay("ListPersonGroupPersons.json")
    replay("ListLargePersonGroupPersons.json")
    # The examples' targetFace (10,10,100,100) is a placeholder: aim it at the photo's face.
    box = api(
        "Face_DetectWithStream",
        "/detect",
        data=faces.read("people/barack_obama/1.jpg"),
        headers=OCTETS,
    )[0]["faceRectangle"]
    target = [box["left"], box["top"], box["width"], box["height"]]
    pg_face = replay(
        "AddPersonGroupPersonFaceFromStream.json", personId=pg_person, targetFace=target
    )["persistedFaceId"]
    replay("AddLargePersonGroupPersonFaceFromStream.json", personId=lpg_person, targetFace=target)
    replay(
        "GetPersonGroupPersistedFace.json", expect=DEVIATIONS["GetPersonGroupPersistedFace.json"][0]
    )
    replay("GetPersonGroupPersistedFace.json", personId=pg_person, persistedFaceId=pg_face)
    replay("QueuePersonGroupTraining.json")
    replay("QueueLargePersonGroupTraining.json")
    replay("GetPersonGroupTrainingStatus.json")
    replay("GetLargePersonGroupTrainingStatus.json")
    detected = replay("DetectWithStream.json")
    face_ids = [f["faceId"] for f in detected] * 2
    # The examples name a group 'sample_group' they never create: use the one built above.
    replay(
        "Identify.json",
        body={
            "largePersonGroupId": "abc",
            "faceIds": face_ids[:2],
            "maxNumOfCandidatesReturned": 1,
            "confidenceThreshold": 0.5,
        },
    )
    replay("VerifyFaceToFace.json", body={"faceId1": face_ids[0], "faceId2": face_ids[1]})
    replay(
        "VerifyFaceToPerson.json",
        body={"faceId": face_ids[0], "personId": pg_person, "personGroupId": "abc"},
    )
    replay("DeletePersonGroupPersonFace.json", personId=pg_person, persistedFaceId=pg_face)
    replay("DeletePersonGroupPerson.json", personId=pg_person)
    replay("DeleteLargePersonGroupPerson.json", personId=lpg_person)
    replay("DeletePersonGroup.json")
    stored = {p.name for p in (contract.root / "examples").glob("*.json")}
    assert stored <= set(replay.replayed), (
        f"examples not replayed: {sorted(stored - set(replay.replayed))}"
    )
