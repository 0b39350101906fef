"""The CPU kernels' benchmark from the shell: ``python benchmarks/cpu_kernels.py [--quick]``,
the same as ``batchnorm bench`` and ``make bench`` (see batchnorm/cli/bench.py)."""

from batchnorm.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
