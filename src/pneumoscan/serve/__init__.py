"""The screening service: REST API and offline web page (``pneumoscan serve``).

``create_app`` is imported on first use, so ``pneumoscan.serve.settings`` stays light.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from pneumoscan.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
