"""Tests of evaluations/."""
