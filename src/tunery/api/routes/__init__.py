"""The REST routes, one module per resource; `api.app` mounts them under /v1beta and /v1."""
