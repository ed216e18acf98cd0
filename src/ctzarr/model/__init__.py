"""The store format: typed metadata of collections, cases, label maps, index, manifest and OME blocks."""
