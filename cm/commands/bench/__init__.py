"""``cm bench solvers|train|sample``: one module per benchmark (``cm.cli`` lists and runs them)."""
