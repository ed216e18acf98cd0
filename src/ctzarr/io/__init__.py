"""Stores and their faults: make_store, retries, obstore, strict reads, locks, case transactions, URL policy."""
