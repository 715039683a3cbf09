"""Leaf helpers used across the package: they import nothing of ``fedpeft_hpc`` but ``errors``.

``files`` (atomic, umask-honouring writes), ``streams`` (every random stream and its tag),
``logs`` (logging set-up for entry points), ``hints`` (did-you-mean suggestions).
"""
