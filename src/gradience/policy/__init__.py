"""Advice: rule thresholds (one place), the check rules and the run rules, and recommendation ordering."""
