"""The training pipeline: prepare, fit, calibrate, save; cross-validation and experiment grids."""
