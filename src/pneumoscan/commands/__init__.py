"""Jobs the faces run: predict and export."""
