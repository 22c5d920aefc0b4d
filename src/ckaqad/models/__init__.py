"""Models: loading (`load`) and the structure adapters (`arch`)."""
