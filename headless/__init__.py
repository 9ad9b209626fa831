"""Workflow files and a headless runner for them (no node code; used by scripts/run_workflow.py and the tests)."""
