"""Simulator: logged traffic replay, world model, traffic splitting, cohorts, events."""
