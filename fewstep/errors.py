"""The one error type users see; the CLI prints its message on one line and exits non-zero."""


class FewstepError(Exception):
    """A mistake the user can fix (bad path, bad size, wrong architecture...). The message says what to do."""

    exit_code = 2


class LoadError(FewstepError):
    """A model or adapter source that cannot be loaded."""


class RequestError(FewstepError):
    """A generation request with an invalid parameter; `field` names it (a GenerateRequest field) where one does."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class ResourceError(FewstepError):
    """Work that would not fit the device (memory) or produced an invalid result (NaN image)."""

    exit_code = 3


class Cancelled(FewstepError):
    """Work stopped on purpose (a callback asked for it, e.g. the client disconnected)."""

    exit_code = 130
