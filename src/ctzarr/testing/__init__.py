"""Test data for ctzarr and its users: synthetic phantoms in the datasets' layouts."""
