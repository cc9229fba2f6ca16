"""The calibration engine: one true-sequential loop for every model family (see engine.py)."""

from jaxquant.calibration.engine import (
    BlockReport,
    CalibrationResult,
    LayerReport,
    ResumeMismatchError,
    calibrate,
    clear_progress,
)

__all__ = ["BlockReport", "CalibrationResult", "LayerReport", "ResumeMismatchError", "calibrate",
           "clear_progress"]
