"""Sources: each owns one kind of input and drains it in bulk into numpy."""
