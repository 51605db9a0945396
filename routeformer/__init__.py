"""routeformer: long-sequence transformers with content-routed sparse attention."""
