"""Placing work on devices: the mesh and shardings (`mesh`), the logical-axis rules (`rules`)."""
