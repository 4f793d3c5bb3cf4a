"""Pieces of PEFT 0.21.2's test harness (Apache-2.0), vendored for tests/test_peft_generic.py."""
