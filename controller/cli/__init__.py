"""The ``nodemesh`` command line (click). root.py wires the verbs; each side's group loads lazily."""
