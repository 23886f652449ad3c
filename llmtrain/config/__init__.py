"""Run configuration: argument dataclasses (``arguments``), YAML + CLI parsing (``parser``), secrets (``secrets``)."""
