"""``fedpeft-hpc bench``: this machine measured against itself.

Every figure is a ratio of two throughputs (or times, or memory sizes) measured in the
same run on the same device, so it says how close the tool comes to what the hardware
allows, never how fast a particular box is. One module per measurement family
(``clients``, ``rounds``, ``memory``, ``ranks``) registers its row builders in
``registry``; ``run`` runs them behind a progress bar, ``report`` prints the table, the
JSON object (CONTRACT keys) and appends the rows to BENCHMARKS.md.
"""
