"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""


class LensmithError(Exception):
    """A failure the user can act on; `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class ParamsError(LensmithError):
    """params.yaml (or a --set override) is invalid: wrong key, type or value."""

    exit_code = 2


class DataError(LensmithError):
    """The input data cannot be used (unreadable source, too many bad files, unknown labels...)."""


class SourceUnavailableError(DataError):
    """A data source (folder, CSV, S3 endpoint) cannot be reached or read."""


class GateFailedError(LensmithError):
    """A quality gate (data validation, model gate) rejected its input."""


class ImageRejected(Exception):
    """A file cannot be used as an image; `reason` is one of the quarantine reason codes (not a LensmithError:
    one bad file is quarantined, it does not stop a stage)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
