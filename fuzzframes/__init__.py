"""Frame generators and the structure-aware fuzzing harness for natd's core.

Shared by ``bench/fuzz.py`` (the long runs) and the tests (``tests/test_fuzz_gateway.py``, the
attack tests); not part of the natd wheel (``[tool.setuptools.packages.find]`` includes
``natd*`` only). A top-level package rather than ``tests/support``: the bench script runs
outside pytest, and ``tests/`` is not a package (pytest imports its helper modules by
directory), so the repo root is the one place both can import from.

* ``frames``: the virtual network and the guest-frame builders;
* ``mutate``: field-aware mutation;
* ``attacks``: frames of a hostile guest sharing the segment (issue 10);
* ``harness``: the ``Fuzzer`` (simulated guests and host, output checks, the run loop).
"""
