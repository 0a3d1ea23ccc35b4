"""REST API under ``/api/v1``: the Flask app factory and its routes."""
