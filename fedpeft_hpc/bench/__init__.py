"""Measurements of this machine for ``fedpeft-hpc bench`` (the data row: ``data_path``)."""
