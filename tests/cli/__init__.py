"""Tests of batchnorm.cli, the command line (a package, as tests/lab: basenames may repeat)."""
