"""Benchmarks: model speed per pruning method and batch size, service load / fault runs (loopback only).

Each module is a CLI (`python -m bench.<name> --help`) that writes its raw numbers as JSON under
`bench/results/`; `bench.plots` turns those into the tables and PNG plots of docs/BENCHMARKS.md. Every loop is
bounded in count and in time, and the load generators refuse any target that is not a loopback address.
"""
