"""Operator fixtures (the operator running against the test control plane): filled in with the operator."""
