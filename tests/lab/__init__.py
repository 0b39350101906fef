"""Tests of batchnorm.lab (a package, so its conftest does not shadow tests/conftest.py)."""
