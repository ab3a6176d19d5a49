"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class ScalelabError(Exception):
    """Base class: the message says what was wrong and what to do."""


class ConfigError(ScalelabError):
    """A recipe, job spec or override is invalid."""


class DataError(ScalelabError):
    """A dataset cannot be read, prepared or verified."""


class CheckpointError(ScalelabError):
    """A checkpoint or model file is missing, corrupt or does not match the spec."""


class TrackingError(ScalelabError):
    """The tracking server / registry cannot be reached or refused a call."""


class RegistryError(ScalelabError):
    """A registered model, version or alias is missing or inconsistent."""


class ClusterError(ScalelabError):
    """A Ray cluster cannot be reached, or the local stack's record of it is unreadable."""
