"""The screening service: REST API and offline web page (``pneumoscan serve``).

``app.create_app`` builds it; ``settings`` holds its default limits and stays light (the CLI's
--help reads them without importing FastAPI or torch).
"""
