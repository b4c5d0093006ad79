"""Operations on a trained MoE model: calibrate, prune, merge and skip experts, compare the results.

Written against the MoE-layer protocol (:mod:`moelab.models.moe_protocol`), so they apply to moelab
runs and to imported models holding ``MoELayer`` blocks. Results persist through
``ModelConfig.layer_overrides``: an operated model saves as an ordinary run directory.
"""

from moelab.ops.calibrate import CalibrationConfig, CalibrationWindows, LayerStats, calibrate, calibration_windows

__all__ = ["CalibrationConfig", "CalibrationWindows", "LayerStats", "calibrate", "calibration_windows"]
