"""The scheduling modes a router runs: the three baselines and auto (a light module: the launcher and demo
name them without importing the scheduler)."""

MODES = ("ar", "sd", "psd", "auto")
