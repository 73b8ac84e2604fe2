"""Projects: every cache a training setup needs, declared once and built (``cachebuild build``) or kept current
(``cachebuild watch``) by calling the jobs.

``options`` maps a file's keys onto the config dataclasses generically; ``files`` reads TOML with line numbers;
``spec`` reads a ``cachebuild.toml`` into a ``Project``; ``musubi`` and ``kohya`` read those trainers' dataset
configs into one; ``shared`` runs the latents of several caches over one decode; ``build`` runs a project;
``watch`` keeps it current. Nothing below this room knows it exists.
"""
