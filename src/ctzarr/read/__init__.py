"""Reading a store: collections, cases, statistics, export, verify and the quick-look picture."""
