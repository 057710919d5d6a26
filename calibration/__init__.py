"""linewatch calibration."""
