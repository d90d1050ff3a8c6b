"""Benchmarks of the kernels (python -m bench.kernels): outside the library, which never imports them."""
