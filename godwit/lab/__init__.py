"""The lab: what tests, benchmarks and the demo need and the product does not.

Network-namespace hosts (:mod:`godwit.lab.netns`), a throwaway cluster of agents on them
(:mod:`godwit.lab.testbed`), the demo (:mod:`godwit.lab.demo`), busybox test bundles
(:mod:`godwit.lab.bundles`) and the test workloads (:mod:`godwit.lab.workloads`).

No product module imports this package (tests/test_layout.py checks it); the one
exception is ``godwit demo``, whose command imports :mod:`godwit.lab.demo` when run.
"""
