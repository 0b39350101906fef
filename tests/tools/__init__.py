"""Tests of batchnorm.tools, the model tools (a package, as tests/lab: basenames may repeat)."""
