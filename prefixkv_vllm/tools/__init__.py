"""Command-line tools: the demo model and calibration."""
