"""recserve offline trainer (torch lives here only; import submodules explicitly)."""
