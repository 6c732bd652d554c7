"""Builders of test and benchmark slides: Aperio-style pyramids and synthetic TMAs with known truth.

Not used by the library itself; tests, benchmarks and the sample-data script import these modules.
"""
