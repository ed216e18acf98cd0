"""Where data comes from: NIfTI reading and the dataset layouts (DAP Atlas, SAROS, pairs)."""
