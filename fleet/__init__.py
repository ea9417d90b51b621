"""`fleet`: the operator CLI, a thin client of the cloud's REST API."""
