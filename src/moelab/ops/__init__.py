"""Operations on trained MoE models: calibrate, prune, merge and skip experts (and compare the results),
upcycle dense models, add LoRA-family adapters, re-route at test time.

Written against the MoE-layer protocol (:mod:`moelab.models.moe_protocol`), so they apply to moelab
runs and to imported models holding ``MoELayer`` blocks. Results persist through
``ModelConfig.layer_overrides``: an operated model saves as an ordinary run directory.
"""

from moelab.ops.calibrate import CalibrationConfig, CalibrationWindows, LayerStats, calibrate, calibration_windows

__all__ = ["CalibrationConfig", "CalibrationWindows", "LayerStats", "calibrate", "calibration_windows"]
