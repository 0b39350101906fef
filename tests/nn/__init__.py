"""Tests of batchnorm.nn, the layers (a package, as tests/lab: basenames may repeat)."""
