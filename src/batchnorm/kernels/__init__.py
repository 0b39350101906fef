"""Fast kernels behind :mod:`batchnorm.ops`; ``cpu`` holds the Numba ones."""
