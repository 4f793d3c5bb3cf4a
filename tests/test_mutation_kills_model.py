"""Behavioural tests that kill mutants of model.py (see docs/mutation.md).

Each test checks what a user sees, not how it is computed.
"""
