"""The operator CLI: one module per noun; ``main`` only assembles them."""
