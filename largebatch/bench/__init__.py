"""``python -m largebatch.bench``: side-by-side benchmarks of the engine against its baselines.

Each sub-benchmark times the engine and its baseline alternately, round after round, in the same
processes, and reports medians and their ratio, so that the ratio holds on a noisy machine.
"""
