"""Tokenize FineWeb / SlimPajama / plain text into a memory-mapped Arrow token store (plan, run, verify)."""
