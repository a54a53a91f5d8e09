"""The Face API's error answers: `{"error": {"code": ..., "message": ...}}` with a status.

Codes and messages follow Microsoft's "Azure AI Face API error codes" page (the tables
per operation); where it names none, the emulator says so in the message.
"""

from __future__ import annotations


class FaceApiError(Exception):
    """An error the emulator answers with, exactly as the service would shape it."""

    def __init__(
        self, status: int, code: str, message: str, *, inner: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner
        """The `innererror` object, when the service sends one."""

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, dict[str, object]]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.inner is not None:
            error["innererror"] = self.inner
        return {"error": error}


def bad_argument(message: str) -> FaceApiError:
    return FaceApiError(400, "BadArgument", message)


UNAUTHORIZED_MESSAGE = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)
