"""Error types shared by the node and the pipelines.

Inner code raises these; boundaries translate them (a DICOM status, a Celery retry, an exit code).
"""


class MammoNodeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(MammoNodeError):
    """The configuration is invalid; startup stops."""


class ModelError(MammoNodeError):
    """The model bundle is missing, corrupt or does not match what the code expects; startup stops."""


class InputError(MammoNodeError):
    """The input cannot be processed (undecodable pixels, no usable view); the run fails without retry."""


class TransientError(MammoNodeError):
    """Something outside us is unavailable (broker, PACS, disk); retried with backoff."""
