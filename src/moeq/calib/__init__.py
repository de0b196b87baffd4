"""Calibration and evaluation text: named sources, token windows."""
