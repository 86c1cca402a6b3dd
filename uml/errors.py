"""User-facing errors: a stage prints the message and exits non-zero, without a traceback."""


class UMLError(Exception):
    """Base class for errors caused by input (params, data, model files), not by a bug."""


class ConfigError(UMLError, ValueError):
    """A parameter file or value is invalid; the message names the file and the key."""


class DataError(UMLError):
    """Raw or prepared data is unusable; the message names the file and the problem."""


class ModelFileError(UMLError):
    """A model artefact (model.pt, model.onnx, metadata.json) is missing or not what it should be."""


class ClusterError(UMLError):
    """The Ray cluster or its storage cannot run the requested work."""
