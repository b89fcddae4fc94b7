"""q2l's benchmarks: ``python -m experiments.benchmarks.suite`` (or ``q2l bench``) runs parts a–e."""
