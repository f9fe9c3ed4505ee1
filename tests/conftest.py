"""helpers.py's fixtures for every test file (pytest.ini puts the root and tests/ on the path)."""

pytest_plugins = ["helpers"]
