"""HTTP layer: dependencies, schemas and routes."""
