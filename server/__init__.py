"""recserve server: model repository, engines, serving pipeline (never imports torch)."""
