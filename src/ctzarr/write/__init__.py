"""Writing a store: the index builder, the case writer, the collection table and convert."""
