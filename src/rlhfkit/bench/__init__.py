"""Benchmarks against peer toolkits (`rlhfkit bench ...`)."""
