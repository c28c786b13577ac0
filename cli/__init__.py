"""The `recserve` command line."""
