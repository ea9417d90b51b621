"""The cloud's REST API: `create_app(fleet)` builds the FastAPI application (see `app.py`)."""

from edgefleet.cloud.api.app import create_app

__all__ = ["create_app"]
