"""Flows: Prefect flows and deployments tying the harness together."""
