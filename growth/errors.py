"""Typed errors. Each message says what is wrong and what to change."""


class GrowthError(Exception):
    """Base class for every error the engine raises on purpose."""


class GraphError(GrowthError):
    """The graph is malformed: a cycle, a dangling input, an unknown node or kind."""


class ShapeError(GraphError):
    """Tensor shapes do not fit together (names the node and both shapes)."""


class OperatorError(GrowthError):
    """A growth operator cannot be applied as asked (names the node and the reason)."""


class UnsupportedModuleError(GrowthError):
    """A module cannot be imported into a NetGraph (names the layer)."""


class CheckpointError(GrowthError):
    """A weights or checkpoint file is missing, corrupt or does not match the graph."""


class ConfigError(GrowthError):
    """A campaign config is invalid (names the file and the key)."""


class ReportError(GrowthError):
    """Run metrics are missing, corrupt or malformed (names the file or the bad value)."""


class DataError(GrowthError):
    """A dataset is missing, malformed or a task stream is asked for impossible values."""


class DivergedError(GrowthError):
    """An optimisation diverged: a non-finite or exploding loss, or non-finite weights (names
    what was trained, the task and epoch, and suggests what to lower). `detail` is the finding
    without the advice, for a caller that knows the better lever (a command's flag)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


class RunDirError(GrowthError):
    """A run directory or output path cannot be used: in use by another process, unwritable,
    a file where a folder belongs, or not a run directory (names the path)."""
