"""Microbenchmarks (pytest-benchmark). A package so ``tests.helpers`` imports from here."""
