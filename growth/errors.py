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
    """Training produced a non-finite loss (names the task and epoch, suggests what to lower)."""


class RunDirError(GrowthError):
    """A run directory or output path cannot be used: in use by another process, unwritable,
    a file where a folder belongs, or not a run directory (names the path)."""
