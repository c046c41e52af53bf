"""mococxr: MoCo-CXR pretraining and evaluation of chest X-ray encoders, tracked in MLflow."""

from mococxr.errors import ConfigError, DataError, MococxrError, TrackingError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "MococxrError", "TrackingError", "__version__"]
