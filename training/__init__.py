"""StateX post-training: expand, train, evaluate, export (``statex-train``)."""
