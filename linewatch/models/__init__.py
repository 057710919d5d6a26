"""Anomaly-model families behind one interface (see base.py)."""
