"""The `zinfer` command line."""
